"""Sampling: filters, the KV-cache decode loop against recomputation, stopping, streaming, and the CLI."""

from __future__ import annotations

import copy
import io
import json
from dataclasses import replace

import pytest
import torch

from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.generate import (
    IncrementalDecoder,
    SamplingSettings,
    apply_repetition_penalty,
    generate,
    generate_tokens,
    run_generation,
    top_k_filter,
    top_p_filter,
)
from pocketlm.model import GPT, ModelConfig, get_config
from pocketlm.tokenizer import Tokenizer, load_tokenizer

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(1)
    return GPT.from_name("gpt2-tiny").eval()


def tiny_llama() -> GPT:
    torch.manual_seed(2)
    cfg = ModelConfig(name="llama-test", family="llama", vocab_size=50257, block_size=64, n_layer=2, n_head=4,
                      n_kv_head=2, n_embd=64, intermediate_size=96, bias=False, tie_embeddings=False)
    return GPT(cfg).eval()


# -- filters ----------------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5]]  # pure: the input is untouched
    before, after = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]  # seen tokens lose probability
    assert after[2] > before[2] and after[3] > before[3]  # unseen ones gain it


def test_top_p_keeps_the_smallest_nucleus_and_at_least_one_token():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # unsorted on purpose
    logits = probs.log()

    def kept(p):
        return torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()

    assert kept(0.7) == [1, 3]  # 0.5 + 0.3 reaches 0.7
    assert kept(0.5) == [1]  # the top token alone reaches 0.5
    assert kept(0.01) == [1]  # never empty
    assert kept(0.9) == [0, 1, 3]
    assert kept(1.0) == [0, 1, 2, 3]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out)[0].tolist() == [False, True, False, True, False]
    assert top_k_filter(logits, 10) is logits


def test_bad_settings_are_user_errors():
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(top_p=0), dict(top_k=0), dict(max_new_tokens=0),
                dict(repetition_penalty=0), dict(num_samples=0), dict(stop=[""])):
        with pytest.raises(UserError):
            SamplingSettings(**bad)


# -- KV cache against recomputation ------------------------------------------------------------------


def greedy_without_cache(model: GPT, idx: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    seq, logits_seen = idx, []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(seq)[0][:, -1, :]
            logits_seen.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, idx.size(1):], logits_seen


@pytest.fixture(scope="module")
def gpt2_124m() -> GPT:
    torch.manual_seed(3)
    return GPT(get_config("gpt2")).eval()  # the real 124M shape


@pytest.mark.parametrize("which, chunk", [
    ("gpt2", None),  # the real 124M shape, once: it is the slowest case
    ("gpt2-tiny", 3),  # chunked prefill: later chunks attend to the cached ones through the mask
    ("llama", None),
    ("llama", 3),
])
def test_kv_cache_matches_recomputation(which, chunk, request):
    model = tiny_llama() if which == "llama" else request.getfixturevalue("gpt2_124m" if which == "gpt2" else "tiny")
    steps = 5
    idx = torch.randint(0, 50257, (2, 8))
    reference, ref_logits = greedy_without_cache(model, idx, steps)
    with torch.inference_mode():
        cache = model.new_cache(2, 8 + steps)
        if chunk is None:
            logits = model(idx, cache=cache)[0]
        else:
            for start in range(0, idx.size(1), chunk):
                logits = model(idx[:, start:start + chunk], cache=cache)[0]
        for step in range(steps):
            torch.testing.assert_close(logits[:, -1, :], ref_logits[step], atol=2e-5, rtol=1e-4)
            logits = model(reference[:, step:step + 1], cache=cache)[0]
    tokens = generate_tokens(model, idx, replace(GREEDY, max_new_tokens=steps), eos_id=None)
    assert torch.equal(tokens, reference)


def test_batched_rows_that_finish_early_do_not_disturb_the_others(tiny):
    idx = torch.tensor([[464, 3290, 318, 257], [40, 588, 284, 1100]])
    solo = [generate_tokens(tiny, idx[i:i + 1], GREEDY, eos_id=None)[0] for i in range(2)]
    eos = int(solo[0][2])  # row 0 ends at its 3rd token, unless that token is row 1's too
    if eos in solo[1].tolist():
        pytest.skip("random model produced the same token in both rows")
    both = generate_tokens(tiny, idx, GREEDY, eos_id=eos)
    assert both[0, :3].tolist() == solo[0][:3].tolist()
    assert set(both[0, 3:].tolist()) <= {eos}  # padded with eos after the end
    assert both[1].tolist() == solo[1][: both.size(1)].tolist()


def test_top_k_one_equals_greedy(tiny, tok):
    greedy = generate(tiny, tok, "The quick brown fox", GREEDY)
    top1 = generate(tiny, tok, "The quick brown fox", replace(GREEDY, temperature=1.3, top_k=1, seed=5))
    assert top1 == greedy


def test_seed_reproducibility_and_num_samples(tiny, tok):
    s = SamplingSettings(max_new_tokens=10, temperature=1.0, num_samples=3, seed=7)
    a = generate(tiny, tok, "Once upon a time", s)
    b = generate(tiny, tok, "Once upon a time", s)
    c = generate(tiny, tok, "Once upon a time", replace(s, seed=8))
    assert len(a) == 3 and a == b and a != c
    assert len(set(a)) > 1  # samples of one batch differ
    # Greedy samples of one batch (shared prefill, copied cache) all equal the single greedy completion.
    single = generate(tiny, tok, "Once upon a time", GREEDY)
    assert generate(tiny, tok, "Once upon a time", replace(GREEDY, num_samples=2)) == single * 2


def test_eos_stops_a_sample(tiny, tok):
    s = SamplingSettings(max_new_tokens=16, temperature=1.0, seed=11)
    idx = torch.tensor([tok.encode("In the beginning")])
    free = generate_tokens(tiny, idx, s, eos_id=None)[0].tolist()
    k = next(i for i in range(2, 16) if free[i] not in free[:i])  # a token that first appears at step k
    stopped = generate_tokens(tiny, idx, s, eos_id=free[k])[0].tolist()
    assert stopped == free[: k + 1]  # the end token is kept in token output; the loop ends there
    # Text level: a tokenizer whose end-of-text is that token ends the completion before it.
    eos_tok = Tokenizer(tok.backend, "gpt2-test-eos", eos_token=tok.backend.id_to_token(free[k]))
    result = run_generation(tiny, eos_tok, "In the beginning", s)
    assert result.texts == [tok.decode(free[:k])]
    assert result.new_tokens == [k + 1]


def test_stop_string_stops_and_is_cut_and_never_streamed(tiny, tok):
    s = SamplingSettings(max_new_tokens=24, temperature=1.0, seed=3)
    full = generate(tiny, tok, "Hello there", s)[0]
    stop = full[10:14]
    expected = full[: full.find(stop)]
    pieces: list[str] = []
    result = run_generation(tiny, tok, "Hello there", replace(s, stop=["zzzz-never", stop]),
                            on_text=lambda i, p: pieces.append(p))
    assert result.texts == [expected]
    assert "".join(pieces) == expected
    assert result.new_tokens[0] < 24


def test_streaming_never_splits_a_multibyte_character(tok):
    text = "naïve café 🙂🎉 日本語 done"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens carry half a character
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == dec.text


def test_streaming_holds_back_a_possible_stop_string(tok):
    dec = IncrementalDecoder(tok, stop=["END"])
    out = ""
    for i in tok.encode("hello world EN"):
        out += dec.push(i)
    assert out == "hello world "  # " EN" might become "END"
    for i in tok.encode("D more"):
        out += dec.push(i)
    assert dec.stopped and out + dec.finish() == "hello world "


def test_empty_prompt_starts_from_end_of_text(tiny, tok):
    text = generate(tiny, tok, "", replace(GREEDY, max_new_tokens=6))[0]
    ref = generate_tokens(tiny, torch.tensor([[tok.eos_id]]), replace(GREEDY, max_new_tokens=6), eos_id=None)
    assert text == tok.decode(ref[0].tolist())


def test_prompt_too_long_for_context_is_a_user_error(tiny, tok):
    prompt = " word" * 250  # 250 tokens; gpt2-tiny has 256
    with pytest.raises(UserError, match="lower --max-new-tokens to 6"):
        generate(tiny, tok, prompt, replace(GREEDY, max_new_tokens=10))
    assert len(generate(tiny, tok, prompt, replace(GREEDY, max_new_tokens=6))) == 1


def test_generation_restores_training_mode(tiny, tok):
    tiny.train()
    try:
        generate(tiny, tok, "x", replace(GREEDY, max_new_tokens=2))
        assert tiny.training
    finally:
        tiny.eval()


# -- CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny, tok):
    from pocketlm.io import save_model

    return save_model(tiny, tok, tmp_path_factory.mktemp("gen") / "tiny-model")


def test_cli_generate_from_a_model_folder(model_dir, tiny, tok, tmp_path, capsys):
    out = tmp_path / "samples.json"
    main(["generate", str(model_dir), "--prompt", "The quick brown fox", "--max-new-tokens", "8",
          "--temperature", "0", "--device", "cpu", "--precision", "fp32", "--json", str(out)])
    captured = capsys.readouterr()
    expected = generate(tiny, tok, "The quick brown fox", replace(GREEDY, max_new_tokens=8))[0]
    assert captured.out == expected + "\n"
    assert "tokens/s" in captured.err
    saved = json.loads(out.read_text())
    assert saved["samples"] == [expected] and saved["new_tokens"] == [8]


def test_cli_prints_every_sample_and_reads_stdin(model_dir, tiny, tok, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Piped prompt\n"))
    main(["generate", str(model_dir), "--max-new-tokens", "5", "--num-samples", "2", "--seed", "1",
          "--device", "cpu", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "===== sample 1/2 =====" in out and "===== sample 2/2 =====" in out
    expected = generate(tiny, tok, "Piped prompt", SamplingSettings(max_new_tokens=5, num_samples=2, seed=1))
    assert out == f"===== sample 1/2 =====\n{expected[0]}\n===== sample 2/2 =====\n{expected[1]}\n"


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--precision", "int3"], "precision"),
])
def test_cli_bad_flags_exit_2_with_one_line(model_dir, flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(model_dir), "--prompt", "x", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_precision_auto_is_bf16_only_where_the_hardware_runs_it(model_dir, tiny, tok, monkeypatch):
    import pocketlm
    from pocketlm import device as dev

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda native=native: native)
        auto = pocketlm.generate(model_dir, "The quick", max_new_tokens=6, temperature=0, device="cpu")
        assert auto["precision"] == expected
    bf16 = pocketlm.generate(model_dir, "The quick", max_new_tokens=6, temperature=0, device="cpu", precision="bf16")
    reference = copy.deepcopy(tiny).to(torch.bfloat16)  # the same weights, decoded in bf16 by the library
    assert bf16["samples"][0] == generate(reference, tok, "The quick", replace(GREEDY, max_new_tokens=6))[0]
    fp32 = pocketlm.generate(model_dir, "The quick", max_new_tokens=6, temperature=0, device="cpu", precision="fp32")
    assert fp32["samples"][0] == generate(tiny, tok, "The quick", replace(GREEDY, max_new_tokens=6))[0]


def test_cli_prompt_file(model_dir, tiny, tok, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("Dear diary,\n", encoding="utf-8")
    main(["generate", str(model_dir), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "4",
          "--temperature", "0", "--device", "cpu", "--precision", "fp32"])
    expected = generate(tiny, tok, "Dear diary,", replace(GREEDY, max_new_tokens=4))[0]
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(model_dir), "--prompt-file", str(tmp_path / "missing.txt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt-file" in err and len(err.strip().splitlines()) == 1


def test_cli_missing_source_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "no-such-model"), "--prompt", "x", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and len(err.strip().splitlines()) == 1


def test_cli_generate_with_a_peft_adapter(model_dir, tiny, tok, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["c_attn"], fan_in_fan_out=True,
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_model, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.inference_mode():
        ref = peft_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_id,
                                  eos_token_id=None, min_new_tokens=6)[0, ids.size(1):]
    main(["generate", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "The quick brown fox",
          "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert out == tok.decode(ref.tolist()) + "\n"
    base = generate(tiny, tok, "The quick brown fox", replace(GREEDY, max_new_tokens=6))[0]
    assert out != base + "\n"  # the adapter was applied


def test_cli_models_lists_exact_parameter_counts(capsys):
    main(["models"])
    out = capsys.readouterr().out
    assert "124,439,808" in next(line for line in out.splitlines() if line.startswith("gpt2 "))
    main(["models", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gpt2"]["parameters"] == 124_439_808
    assert rows["smollm2-135m"]["family"] == "llama" and rows["smollm2-135m"]["kv_heads"] == 3
