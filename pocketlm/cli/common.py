"""Pieces every subcommand shares (no torch: `pocketlm --help` stays fast)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has a real one: never "(default: None)" for flags whose unset
    value means "the recipe's" (nor an empty string or list), and not twice where the help text already
    names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default is argparse.SUPPRESS \
            or action.default in ("", [])  # `is False`, not ==: a default of 0 is worth showing
        if empty or "(default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)
