"""`pocketlm study run|report|list`: grids of knobs run side by side, and their report."""

from __future__ import annotations

import argparse
import sys

from pocketlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="run a grid of knobs side by side and report where quality quietly fails",
        description="Studies: a base recipe, data, axes of knobs and measures in one YAML file "
                    "(docs/studies.md). Every cell is an ordinary run directory under --out.")
    sub = p.add_subparsers(dest="study_command", metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="run (or continue) a study into DIR",
                       description="Run every cell of STUDY (a YAML file or a built-in name) into DIR. Killed, "
                                   "the same command continues: finished cells are kept and the interrupted "
                                   "cell resumes exactly.")
    r.add_argument("study", metavar="STUDY", help="a study YAML file or a built-in study (pocketlm study list)")
    r.add_argument("--out", metavar="DIR", help="study folder: results, report and one run directory per cell")
    r.add_argument("--quick", action="store_true", help="the study's small version (its `quick:` section)")
    r.add_argument("--only", nargs="+", metavar="PATTERN", help="run only cells whose name matches (shell-style)")
    r.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    r.add_argument("--retry-failed", action="store_true", help="run cells that failed before again")
    r.add_argument("--data", metavar="PATH", help="use this corpus (or prepared folder) instead of the study's")
    r.add_argument("--delimiter", metavar="TEXT", help="cut --data into documents, e.g. '<LOC>...</LOC>'")
    r.add_argument("--base", metavar="MODEL", help="start fine-tunes from this base (e.g. a GPT-2 folder)")
    r.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="override a knob of the base recipe, e.g. --set max_steps=50 (repeatable)")
    r.add_argument("--executor", default="local", choices=["local", "ray"], help="where cells run (local)")
    r.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    r.add_argument("--cpus-per-cell", type=float, default=1, help="Ray: CPUs each cell reserves (1)")
    r.add_argument("--gpus-per-cell", type=float, default=0, help="Ray: GPUs each cell reserves (0)")
    r.add_argument("--threads", type=int, help="torch threads per cell (default: torch's own choice)")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    r.set_defaults(func=run)
    rep = sub.add_parser("report", help="write DIR/report.md and DIR/report.html",
                         description="Write the report of a study folder: results table, Pareto fronts of "
                                     "quality against each cost, validation curves, samples, quiet failures.")
    rep.add_argument("dir", metavar="DIR", help="the --out of `pocketlm study run`")
    rep.set_defaults(func=report)
    ls = sub.add_parser("list", help="the built-in studies", description="The built-in studies (seed reproductions).")
    ls.add_argument("--knobs", action="store_true", help="also list every knob and measure a study can use")
    ls.set_defaults(func=list_studies)
    p.set_defaults(func=lambda args: (p.print_help(), sys.exit(2)))


def _overrides(args: argparse.Namespace) -> dict:
    import yaml

    out: dict = {}
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write KNOB=VALUE, e.g. --set max_steps=50")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    if args.base:
        out["base"] = args.base
    if args.data:
        out["data"] = args.data
    if args.delimiter:
        if not args.data:
            raise UserError("--delimiter cuts the corpus given with --data: give --data too")
        out["delimiter"] = args.delimiter
    return out


def run(args: argparse.Namespace) -> None:
    from pocketlm.study import load_study, run_study, write_report
    from pocketlm.study.runner import format_plan, plan

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.cpus_per_cell <= 0 or args.gpus_per_cell < 0:
        raise UserError("--cpus-per-cell must be positive and --gpus-per-cell at least 0")
    study = load_study(args.study, quick=args.quick, overrides=_overrides(args))
    cells = plan(study, args.only)
    if args.dry_run:
        print(format_plan(study, cells))
        return
    if not args.out:
        raise UserError("no --out DIR: name the folder the study writes into (e.g. --out studies/mine)")
    print(format_plan(study, cells), file=sys.stderr)
    rows = run_study(study, args.out, only=args.only, executor=args.executor, address=args.address,
                     cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell, threads=args.threads,
                     retry_failed=args.retry_failed)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} cells ok; results in {args.out}/results.jsonl")
    if not args.no_report:
        paths = write_report(args.out)
        print(f"report: {paths['html']}")


def report(args: argparse.Namespace) -> None:
    from pocketlm.study import write_report

    paths = write_report(args.dir)
    print(f"wrote {paths['md']} and {paths['html']}")


def list_studies(args: argparse.Namespace) -> None:
    from pocketlm.study import describe_builtins

    print(describe_builtins(knobs=args.knobs))
