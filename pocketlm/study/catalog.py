"""`pocketlm study list`: the built-in studies (pocketlm/studies/*.yaml), and with --knobs every knob and
measure a study file can name."""

from __future__ import annotations

import yaml

from pocketlm.errors import UserError
from pocketlm.study import knobs as K
from pocketlm.study.measures import MEASURES, PENDING
from pocketlm.study.spec import STUDIES_DIR, builtin_names


def _cells(name: str, quick: bool) -> str:
    from pocketlm.study.grid import expand
    from pocketlm.study.spec import load_study

    try:
        return str(len(expand(load_study(name, quick=quick))))
    except UserError as exc:  # e.g. POCKETLM_SHARED_DATA unset: say so instead of a count
        return f"? ({str(exc).split(': ', 1)[-1][:60]})"


def describe(knobs: bool = False) -> str:
    lines = ["built-in studies (pocketlm study run NAME --out DIR [--quick]):", ""]
    for name in builtin_names():
        raw = yaml.safe_load((STUDIES_DIR / f"{name}.yaml").read_text()) or {}
        first = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
        lines.append(f"  {name}")
        lines.append(f"      {first}")
        lines.append(f"      cells: {_cells(name, False)} (quick: {_cells(name, True)})")
    if knobs:
        lines += ["", "knobs (axes or base recipe keys):"]
        K.post_training()
        for k in [K.knob("method"), *K.KNOBS.values()]:
            lines.append(f"  {k.name:<24} {k.kind:<6} {k.help}")
        for k, _, _ in K.POST_TRAINING.values():
            lines.append(f"  {k.name:<24} {k.kind:<6} {k.help}")
        for name, why in K.PENDING.items():
            lines.append(f"  {name:<24} (not available: {why})")
        lines += ["", "measures:"]
        for name, spec in MEASURES.items():
            opts = ", ".join(sorted(spec["options"])) or "-"
            lines.append(f"  {name:<16} columns {', '.join(spec['columns'])}; options {opts}")
        for name, why in PENDING.items():
            lines.append(f"  {name:<16} (not available: {why})")
        lines.append("  costs, always: trainable_params, peak_memory_bytes, tokens_per_s, train_s, size_bytes")
    return "\n".join(lines)
