"""The command line as a whole: light start-up, and choices that mirror the library's."""

from __future__ import annotations

import subprocess
import sys


def test_parsing_the_command_line_does_not_import_torch():
    # `pocketlm prepare --help` and friends must not pay torch's multi-second import.
    code = "import sys, pocketlm.cli; pocketlm.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_choices_match_the_library():
    from pocketlm import finetune, names
    from pocketlm.cli import export as export_cli
    from pocketlm.cli import finetune as finetune_cli

    assert finetune_cli.METHODS == finetune.METHODS
    assert export_cli.GGUF_EXPORT_TYPES == names.GGUF_EXPORT_TYPES
    from pocketlm.cli import quantize as quantize_cli
    from pocketlm.compress import formats, qat

    assert quantize_cli.QUANT_FORMATS == formats.FORMATS and finetune_cli.QAT_FORMATS == qat.QAT_FORMATS


def test_every_subcommand_has_help():
    from pocketlm.cli import COMMAND_MODULES, build_parser

    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert sorted(choices) == sorted(COMMAND_MODULES)
