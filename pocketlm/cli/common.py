"""Pieces every subcommand shares (no torch: `pocketlm --help` stays fast)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has a real one: never "(default: None)" for flags whose unset
    value means "the recipe's", and not twice where the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)
