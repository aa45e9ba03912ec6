"""What a study measures in each cell, after training, on the cell's best checkpoint.

Quality: held-out loss and bits per byte, chrF on prompt/reference pairs, the form pass rate of generated
samples, HellaSwag, the forgetting probe (bits per byte on general text, before vs after), and the KL
divergence from the base model. Costs are always recorded: trainable parameters, peak memory, training
tokens/s, training time, size on disk; `decode_speed` adds decode tokens/s.

Each measure has a direction (lower or higher is better), used by the report's Pareto fronts.
"""

from __future__ import annotations

from pathlib import Path

from pocketlm.errors import UserError

# measure -> (result columns, option names, lower_is_better per column)
MEASURES: dict[str, dict] = {
    "val_loss": {"columns": {"val_loss": True, "perplexity": True}, "options": {"max_tokens", "context"}},
    "bits_per_byte": {"columns": {"bits_per_byte": True}, "options": {"max_tokens", "context"}},
    "chrf": {"columns": {"chrf": False}, "options": {"prompts", "sonnet", "limit", "max_new_tokens",
                                                       "temperature", "top_p", "top_k", "repetition_penalty",
                                                       "form", "seed"}},
    "form_pass_rate": {"columns": {"form_pass_rate": False}, "options": {"form", "n"}},
    "hellaswag": {"columns": {"hellaswag_acc": False, "hellaswag_acc_norm": False}, "options": {"path", "limit"}},
    "forgetting": {"columns": {"forgetting_bpb": True}, "options": {"text", "max_tokens"}},
    "kl": {"columns": {"kl_from_base": True}, "options": {"max_tokens"}},
    "decode_speed": {"columns": {"decode_tokens_per_s": False}, "options": {"tokens"}},
    "zero_shot": {"columns": {"zero_shot_acc": False, "zero_shot_acc_calibrated": False},
                  "options": {"probe", "path", "limit"}},
}
PENDING: dict[str, str] = {}
# Costs every cell records; True = lower is better.
COSTS = {"trainable_params": True, "peak_memory_bytes": True, "tokens_per_s": False, "size_bytes": True,
         "train_s": True, "decode_tokens_per_s": False}
DEFAULT_HELLASWAG = "${POCKETLM_SHARED_DATA}/hellaswag/hellaswag_val.jsonl"
ZERO_SHOT_DEFAULTS = {"sentiment": "${POCKETLM_SHARED_DATA}/sst/ids-sst-dev.csv",
                      "paraphrase": "${POCKETLM_SHARED_DATA}/quora/quora-dev.csv"}


def lower_is_better(column: str) -> bool:
    for spec in MEASURES.values():
        if column in spec["columns"]:
            return spec["columns"][column]
    return COSTS.get(column, True)


def quality_columns(measures: dict) -> list[str]:
    return [c for m in measures for c in MEASURES[m]["columns"] if c not in COSTS]


def parse_measures(study, raw, here: Path) -> dict:
    """{name: options} from `measures:` (names, or one-key mappings of a name to its options)."""
    from pocketlm.study.knobs import expand_path

    if not raw:
        raise UserError(f"{study.where('measures')}: list what to measure, e.g. measures: [val_loss, "
                        "bits_per_byte]")
    if not isinstance(raw, list):
        raise UserError(f"{study.where('measures')}: measures is a list")
    out: dict[str, dict] = {}
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            options = options or {}
        else:
            raise UserError(f"{study.where('measures', i)}: a measure is a name or `name: {{options}}`")
        where = study.where("measures", i)
        if name in PENDING:
            raise UserError(f"{where}: measure {name!r} is not available: {PENDING[name]}")
        if name not in MEASURES:
            raise UserError(f"{where}: unknown measure {name!r}: choose from {', '.join(MEASURES)}")
        if not isinstance(options, dict):
            raise UserError(f"{where}: the options of {name} are a mapping")
        bad = set(options) - MEASURES[name]["options"]
        if bad:
            raise UserError(f"{where}: {name} has no option {sorted(bad)[0]!r}: valid are "
                            f"{', '.join(sorted(MEASURES[name]['options'])) or 'none'}")
        out[name] = _check_options(name, dict(options), where, here, study, expand_path)
    return out


def _check_options(name: str, options: dict, where: str, here: Path, study, expand_path) -> dict:
    from pocketlm.eval.forms import get_form

    def path_option(key: str, default: str | None = None):
        value = options.get(key, default)
        if value is None:
            return None
        try:
            p = expand_path(value, here)
        except UserError as exc:
            raise UserError(f"{where}: {name}.{key}: {exc}") from exc
        if not Path(p).exists():
            raise UserError(f"{where}: {name}.{key}: {p} does not exist")
        return p

    try:
        if name == "chrf":
            if "sonnet" in options:
                pair = options["sonnet"]
                if not isinstance(pair, list) or len(pair) != 2:
                    raise UserError("sonnet is [PROMPTS_FILE, GOLD_FILE]")
                options["sonnet"] = [expand_path(p, here) for p in pair]
                for p in options["sonnet"]:
                    if not Path(p).exists():
                        raise UserError(f"{p} does not exist")
            elif "prompts" in options:
                options["prompts"] = path_option("prompts")
            else:
                raise UserError("chrf needs prompts: FILE.jsonl (prompt/reference pairs) or sonnet: [PROMPTS, GOLD]")
            if options.get("form"):
                get_form(options["form"])
        if name == "form_pass_rate":
            if not options.get("form"):
                raise UserError("form_pass_rate needs form: sonnet, screenplay or greentext")
            get_form(options["form"])
            if not study.sampling.get("prompts") and "chrf" not in (study.raw.get("measures") or []):
                pass  # samples from the sampling prompts, or from an empty prompt
        if name == "hellaswag":
            options["path"] = path_option("path", DEFAULT_HELLASWAG)
            options.setdefault("limit", 100)
        if name == "zero_shot":
            from pocketlm.eval.zero_shot import PROBES

            if options.get("probe") not in PROBES:
                raise UserError(f"probe must be one of {', '.join(PROBES)}, got {options.get('probe')!r}")
            options["path"] = path_option("path", ZERO_SHOT_DEFAULTS[options["probe"]])
            options.setdefault("limit", 200)
        if name == "forgetting":
            options["text"] = path_option("text", DEFAULT_HELLASWAG)
        for key in ("limit", "max_tokens", "max_new_tokens", "n", "tokens", "context"):
            if key in options and (not isinstance(options[key], int) or options[key] < 1):
                raise UserError(f"{key} must be a positive integer, got {options[key]!r}")
    except UserError as exc:
        raise UserError(f"{where}: {name}: {exc}") from exc
    return options
