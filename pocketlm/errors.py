"""User-facing errors: the CLI prints them as one line and exits with code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing file, incompatible settings.

    The message says what is wrong and how to fix it, in one line.
    """
