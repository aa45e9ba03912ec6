"""Quiet failures: cells whose loss looks fine while another quality measure falls behind.

The seeds' lessons in one rule: a cell A is flagged for measure M when some cell B has a loss no better
than A's, yet B beats A on M by more than M's margin (INT8 QAFT keeps chrF but loses zero-shot
paraphrase; a lower loss does not mean valid sonnets). Comparing with a cell of worse loss is what makes
the failure quiet: ranking by loss alone would have picked A.
"""

from __future__ import annotations

import math

from pocketlm.study.measures import lower_is_better

# measure -> smallest difference that counts (in the measure's own unit)
MARGINS = {"chrf": 1.0, "form_pass_rate": 0.1, "chrf_form_pass_rate": 0.1, "hellaswag_acc": 0.02,
           "forgetting_bpb": 0.02, "zero_shot_acc": 0.03}
NAMES = {"chrf": "chrF", "form_pass_rate": "form pass rate", "chrf_form_pass_rate": "form pass rate of the chrF "
         "generations", "hellaswag_acc": "HellaSwag accuracy", "forgetting_bpb": "forgetting probe",
         "zero_shot_acc": "zero-shot accuracy"}


def _v(group: dict, col: str):
    pair = group.get(col)
    return pair[0] if pair and isinstance(pair[0], (int, float)) and math.isfinite(pair[0]) else None


def quiet_failures(groups: list[dict], quality: str | None, limit: int = 12) -> list[str]:
    loss = quality if quality in ("bits_per_byte", "val_loss") else next(
        (c for c in ("bits_per_byte", "val_loss") if any(c in g for g in groups)), None)
    if loss is None:
        return []
    found = []
    for measure, margin in MARGINS.items():
        better_low = lower_is_better(measure)
        for a in groups:
            la, ma = _v(a, loss), _v(a, measure)
            if la is None or ma is None:
                continue
            worst = None
            for b in groups:
                lb, mb = _v(b, loss), _v(b, measure)
                if b is a or lb is None or mb is None or lb < la:
                    continue
                gap = (ma - mb) if better_low else (mb - ma)
                if gap > margin and (worst is None or gap > worst[0]):
                    worst = (gap, b, lb, mb)
            if worst is not None:
                gap, b, lb, mb = worst
                found.append((gap / margin, f"{a['name']}: {loss} {la:.4f} is no worse than {b['name']}'s {lb:.4f}, but its "
                             f"{NAMES[measure]} falls behind ({ma:.3g} vs {mb:.3g})"))
    found.sort(key=lambda t: -t[0])  # the largest gaps (in margins) first
    lines = [text for _, text in found[:limit]]
    if len(found) > limit:
        lines.append(f"... and {len(found) - limit} more of the same kind (smaller gaps)")
    return lines
