"""Names shared by the CLI, the library and the tests: one place, no torch, cheap to import.

Anything a flag's `choices`, a recipe key's validation and a library check all need lives here, so the
three never drift apart.
"""

from __future__ import annotations

# Model families pocketlm implements (Hugging Face model_type / GGUF general.architecture).
FAMILIES: tuple[str, ...] = ("gpt2", "llama")

# Fine-tuning methods (`pocketlm finetune --method`); pretraining is a TrainConfig.method of its own.
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
ADAPTER_METHODS: tuple[str, ...] = ("lora", "qlora")  # methods that train a PEFT adapter, not the weights
CLASSIFY_METHODS: tuple[str, ...] = ("head", *METHODS)  # `finetune --task classify`; head: base frozen
TRAIN_METHODS: tuple[str, ...] = ("pretrain", "head", *METHODS)  # every TrainConfig.method

# Training precision (`--precision`): auto = bf16 where the hardware runs it natively, else fp32.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

# Built-in text forms checked by `eval --form` and `--eval-form` (pocketlm.eval.forms registers more).
FORMS: tuple[str, ...] = ("sonnet", "screenplay", "greentext")

# LoRA target presets (`--targets`), and the module paths each selects per model family.
TARGET_PRESETS: tuple[str, ...] = ("attn", "attn+mlp", "all-linear")
TARGET_MODULES: dict[str, dict[str, list[str]]] = {
    "gpt2": {"attn": ["attn.c_attn"], "attn+mlp": ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]},
    "llama": {
        "attn": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"],
        "attn+mlp": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    },
}

# Number formats `pocketlm quantize --format` writes, and those `finetune --qat` trains against.
QUANT_FORMATS: tuple[str, ...] = ("fp64", "fp32", "fp16", "bf16", "fp8", "int8", "int4", "nf4")
QAT_FORMATS: tuple[str, ...] = ("int8", "int4", "fp8")

# Model export formats (`pocketlm export --format`) and GGUF tensor types it writes.
EXPORT_FORMATS: tuple[str, ...] = ("hf", "gguf")
GGUF_EXPORT_TYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
