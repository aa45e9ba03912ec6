"""Classifier checkpoints: what a classifier is (labels, columns, length), how it is saved so that
transformers and PEFT load it, and how pocketlm loads it back.

- full / head runs: a model folder whose config.json says `LlamaForSequenceClassification` (or
  `GPT2ForSequenceClassification`) with id2label/label2id/pad_token_id, and `score.weight` in
  model.safetensors: `AutoModelForSequenceClassification.from_pretrained(folder)` gives the same logits.
- lora / qlora runs: a PEFT adapter folder (task_type SEQ_CLS) whose head is saved whole under
  `modules_to_save: ["score"]`: `PeftModel.from_pretrained(AutoModelForSequenceClassification..., folder)`.
- every checkpoint also holds `classifier.json` (ClassifierInfo: labels as the data spells them, the
  columns it was trained on, max length, separator), which pocketlm reads first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pocketlm.classify.model import HEAD, attach_head
from pocketlm.errors import UserError

INFO_FILE = "classifier.json"
FORMAT = "pocketlm.classifier.v1"


@dataclass
class ClassifierInfo:
    labels: list  # class i is labels[i] (integers or strings, as the training file has them)
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    max_length: int = 512
    separator_id: int | None = None  # between the two texts of a pair
    symmetric_pairs: bool = False  # trained with --swap-pairs: predictions average both orders of a pair
    pad_id: int = 0
    method: str = "full"
    base: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierInfo:
        from pocketlm.versions import check_format

        if not isinstance(data, dict):
            raise UserError(f"classifier metadata is a JSON {type(data).__name__}, not an object: save the "
                            "classifier again")
        if "format" in data:
            check_format(data["format"], FORMAT, INFO_FILE, "pocketlm classifier metadata",
                         "save the classifier again")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def hf_classifier_config(config: dict, info: ClassifierInfo) -> dict:
    """A causal-LM config.json turned into transformers' sequence-classification one."""
    family = config.get("model_type")
    arch = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}.get(family)
    if arch is None:
        raise UserError(f"cannot export a {family!r} classifier for transformers: pocketlm exports gpt2 and llama")
    out = dict(config)
    out["architectures"] = [arch]
    out["id2label"] = {str(i): str(label) for i, label in enumerate(info.labels)}
    out["label2id"] = {str(label): i for i, label in enumerate(info.labels)}
    # transformers pools the rightmost token that is not pad_token_id; pocketlm pools by the attention
    # mask. They agree whenever the texts themselves do not end in this token.
    out["pad_token_id"] = info.pad_id
    out["problem_type"] = "single_label_classification"
    out["pocketlm_classifier"] = info.to_dict()
    return out


def _write_info(directory: Path, info: ClassifierInfo) -> None:
    (directory / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")


def _patch_adapter(folder: Path, model) -> None:
    """Add the head to a PEFT adapter folder written by pocketlm.lora: modules_to_save + its weights."""
    from safetensors.torch import load_file, save_file

    from pocketlm.io.peft import CONFIG_FILE, WEIGHTS_FILE

    config = json.loads((folder / CONFIG_FILE).read_text())
    config["task_type"] = "SEQ_CLS"
    config["modules_to_save"] = [HEAD]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    weights = load_file(str(folder / WEIGHTS_FILE))
    head = getattr(model, HEAD)
    weights[f"base_model.model.{HEAD}.weight"] = head.weight.detach().to("cpu", torch.float32).contiguous()
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


class ClassifierSaver:
    """The trainer's WeightSaver for classifiers: the method's own saver, plus the head and classifier.json."""

    def __init__(self, inner, info: ClassifierInfo) -> None:
        self.inner = inner  # FullModelSaver (full, head) or pocketlm.io.peft.LoraSaver (lora, qlora)
        self.info = info

    def save(self, model, tokenizer, directory: Path) -> None:
        from pocketlm.io.peft import ADAPTER_DIR, _unwrap_module

        directory = Path(directory)
        model = _unwrap_module(model)
        self.inner.save(model, tokenizer, directory)
        if (directory / ADAPTER_DIR).is_dir():
            _patch_adapter(directory / ADAPTER_DIR, model)
            _write_info(directory / ADAPTER_DIR, self.info)
        else:
            config_path = directory / "config.json"
            config_path.write_text(json.dumps(hf_classifier_config(json.loads(config_path.read_text()),
                                                                   self.info), indent=2) + "\n")
        _write_info(directory, self.info)

    def load(self, model, directory: Path) -> None:
        self.inner.load(model, Path(directory))  # full: score.weight is in the folder; lora: modules_to_save


def save_classifier(model, tokenizer, directory: str | Path, info: ClassifierInfo) -> Path:
    """A standalone classifier folder (merged if it has LoRA layers): loads in transformers and pocketlm."""
    from pocketlm.atomic import AtomicDir
    from pocketlm.io.folders import write_model_files

    with AtomicDir(directory) as tmp:
        write_model_files(model, tokenizer, tmp)
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(hf_classifier_config(json.loads(config_path.read_text()), info),
                                          indent=2) + "\n")
        _write_info(tmp, info)
    return Path(directory)


# -- loading -------------------------------------------------------------------------------------------
def _info_from(folder: Path, config: dict | None) -> ClassifierInfo:
    if (folder / INFO_FILE).is_file():
        return ClassifierInfo.from_dict(json.loads((folder / INFO_FILE).read_text()))
    if config is not None and "pocketlm_classifier" in config:
        return ClassifierInfo.from_dict(config["pocketlm_classifier"])
    if config is not None and config.get("id2label") and any(
            a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        id2label = config["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
        return ClassifierInfo(labels=labels, pad_id=config.get("pad_token_id") or 0)
    raise UserError(f"{folder} is not a classifier (no {INFO_FILE}, no *ForSequenceClassification config): "
                    "train one with `pocketlm finetune --task classify`")


def _adapter_info(folder: Path, adapter: Path) -> ClassifierInfo:
    """classifier.json beside the adapter, else (a PEFT-made SEQ_CLS adapter) the head's size in its weights."""
    from pocketlm.io.peft import WEIGHTS_FILE

    for where in (folder, adapter):
        if (where / INFO_FILE).is_file():
            return _info_from(where, None)
    from safetensors import safe_open

    path = adapter / WEIGHTS_FILE
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith((f".{HEAD}.weight", ".classifier.weight")):
                    n = f.get_slice(key).get_shape()[0]
                    return ClassifierInfo(labels=[f"LABEL_{i}" for i in range(n)], method="lora")
    raise UserError(f"the adapter in {adapter} has no classification head (no {INFO_FILE}, no score weights): "
                    "it is a language-model adapter; use `pocketlm eval` without --classify")


def _step_folder(source: str | Path) -> Path:
    from pocketlm.io.sources import resolve_model_dir

    return resolve_model_dir(source)


def merge_classifier(source: str | Path, out: str | Path, *, base: str | None = None) -> ClassifierInfo:
    """A LoRA classifier (run, step or adapter folder) folded into its base: a standalone classifier folder."""
    from dataclasses import replace

    from pocketlm import lora

    model, tokenizer, info = load_classifier(source, base=base)
    lora.merge_lora(model)
    info = replace(info, method=f"{info.method}-merged")
    save_classifier(model, tokenizer, out, info)
    return info


def load_classifier(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    *, base: str | None = None):
    """(model with its head, tokenizer, ClassifierInfo) from a classify run, a checkpoint, a classifier
    model folder (pocketlm's or transformers' *ForSequenceClassification) or a LoRA classifier adapter
    (on `base` when given, else the base its adapter_config names)."""
    from pocketlm.io import hf
    from pocketlm.io.folders import load_state_into, read_hf_weights
    from pocketlm.io.peft import ADAPTER_DIR, CONFIG_FILE, load_adapter, read_adapter_config
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer

    folder = _step_folder(source)
    adapter = folder / ADAPTER_DIR if (folder / ADAPTER_DIR / CONFIG_FILE).is_file() else \
        folder if (folder / CONFIG_FILE).is_file() else None
    if adapter is not None and not (folder / "config.json").is_file():
        from pocketlm.io import load_model

        info = _adapter_info(folder, adapter)
        base = base or read_adapter_config(adapter).get("base_model_name_or_path") or info.base
        if not base:
            raise UserError(f"the adapter in {adapter} does not name its base model")
        model, tokenizer = load_model(base, device="cpu", dtype=torch.float32)
        attach_head(model, info.num_labels)
        load_adapter(model, adapter)
    else:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise UserError(f"{folder} is not a classifier folder: config.json is missing")
        config = json.loads(config_path.read_text())
        info = _info_from(folder, config)
        tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        model_config = hf.from_hf_config(config, name=folder.name, tokenizer=str(folder) if tokenizer else "")
        tokenizer = tokenizer or load_tokenizer(model_config.tokenizer or "gpt2")
        model = GPT.empty(model_config)  # no random init: every weight comes from the folder
        attach_head(model, info.num_labels)
        load_state_into(model, read_hf_weights(folder), str(folder))
    model.eval()
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model, tokenizer, info
