"""`pocketlm models`: the named model configs, with exact parameter counts (pocketlm.list_models)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the named model configs",
                              description="The named model configs (pocketlm.model.CONFIGS), with exact "
                              "parameter counts (a tied embedding counts once, as Hugging Face counts).")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.model import list_models

    rows = list_models()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    header = ["name", "family", "layers", "heads", "width", "context", "vocab", "parameters", "tokenizer"]
    table = [header]
    for r in rows:
        heads = str(r["heads"]) if r["kv_heads"] == r["heads"] else f"{r['heads']}/{r['kv_heads']}kv"
        table.append([r["name"], r["family"], str(r["layers"]), heads, str(r["width"]), str(r["context"]),
                      str(r["vocab"]), f"{r['parameters']:,}", r["tokenizer"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 7}
    for row in table:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
