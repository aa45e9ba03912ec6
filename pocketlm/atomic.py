"""Atomic writes: a crash mid-write never leaves a half-written file or folder where a reader looks.

Files and folders are written under a temporary name in the same directory and renamed into place
(os.replace is atomic on POSIX). tempfile makes them 0600/0700; they are given the permissions a plain
open()/mkdir() would (0666/0777 less the umask) before the rename, so what is shared stays readable.
Leftover temporaries of a killed process (`.NAME.*.tmp`) are removed by `clean_stale_temporaries`.
No torch import here, so light commands stay fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from pocketlm.errors import UserError


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 1 << 20  # a writer that failed in a folder with less free space than this ran out of it


def free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full_error(exc: BaseException, where: Path) -> UserError | None:
    """A one-line UserError if exc is a failed write into a full disk, else None.

    torch.save reports a full disk as a RuntimeError ("unexpected pos") and safetensors as a SafetensorError,
    so besides ENOSPC the free space of the folder written to decides.
    """
    if isinstance(exc, UserError):
        return None
    full = (isinstance(exc, OSError) and exc.errno in _FULL) or "No space left on device" in str(exc)
    if not full and (isinstance(exc, (RuntimeError, OSError)) or type(exc).__name__ == "SafetensorError"):
        space = free_bytes(where if where.is_dir() else where.parent)
        full = space is not None and space < LOW_SPACE_BYTES
    if not full:
        return None
    return UserError(f"no space left on the device while writing {where}: free some space (or choose an --out on "
                     "another disk) and run the command again; what was written before is unchanged")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_write_bytes(path: str | Path, write) -> None:
    """`write(file_object)` fills a temporary file, which then replaces `path` (e.g. a GGUF export)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, a path under a file,
    a read-only or missing-permission folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file path, e.g. {path / 'out.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest folder that exists: the missing ones will be made in it
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {parent} is not writable (read-only or no permission): "
                        "choose another path")


def check_output_dir(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output folder path that cannot be written (a file is refused by callers
    that do not replace files)."""
    path = Path(path).expanduser()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {parent} is not writable (read-only or no permission): "
                        "choose another path")


def make_temp_dir(final: Path) -> Path:
    """A fresh hidden folder beside `final` with the permissions mkdir would give it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, dir_mode())
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Put folder tmp where final is: the old one is moved aside first and removed only afterwards."""
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def clean_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Remove `.NAME.*.tmp` / `.NAME.old` left in folder by a killed process (any NAME if None).

    A process killed between replace_dir's two renames left NAME missing and the previous version in
    `.NAME.old`: that one is put back first, never removed.
    """
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith(f".{name}." if name else "."):
            continue
        if p.name.endswith(".old"):
            final = folder / p.name[1:-len(".old")]
            if not (final.exists() or final.is_symlink()):
                os.replace(p, final)
                continue
        elif not p.name.endswith(".tmp"):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class AtomicDir:
    """`with AtomicDir(final) as tmp:` write into tmp; on success tmp becomes final in one rename."""

    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.tmp = make_temp_dir(self.final)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            full = disk_full_error(exc, self.final)
            if full is not None:
                raise full from exc
            return
        _fix_modes(self.tmp)
        replace_dir(self.tmp, self.final)


def _fix_modes(folder: Path) -> None:
    """Files written inside by tempfile-based writers get the umask's mode too."""
    fmode, dmode = file_mode(), dir_mode()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p) and (os.stat(p).st_mode & 0o777) != fmode:
                os.chmod(p, fmode)
