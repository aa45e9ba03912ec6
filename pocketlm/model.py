"""The whole decoder-only transformer in one file: GPT-2 and Llama-family models, with a KV cache.

One implementation, two families chosen by `ModelConfig.family`:
- "gpt2":  learned position embeddings, LayerNorm, fused QKV (`c_attn`), GELU MLP, biases.
- "llama": rotary position embeddings, RMSNorm, separate q/k/v/o projections with grouped-query
           attention, SwiGLU MLP, no biases.

Module names follow Hugging Face GPT-2 (`transformer.h.N.attn.c_attn`, ...) so that checkpoints and
PEFT adapters need no renaming; for Llama the leaf names follow Hugging Face Llama (`q_proj`,
`gate_proj`, ...) and `pocketlm.io.hf` maps the `model.layers.N.self_attn` prefix. Linear weights are
stored as nn.Linear does, (out, in); GPT-2's Conv1D layout is transposed only at the HF boundary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pocketlm import ops
from pocketlm.device import autocast_dtype
from pocketlm.errors import UserError
from pocketlm.kv_cache import BatchKVCache, KVCache, StaticKVCache
from pocketlm.names import FAMILIES


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    family: str = "gpt2"  # "gpt2" or "llama"
    vocab_size: int = 50257  # tokens the tokenizer can produce
    padded_vocab_size: int | None = None  # embedding rows; a multiple of 64 is faster on GPUs
    block_size: int = 1024  # longest context
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    n_embd: int = 768
    intermediate_size: int | None = None  # MLP width; None means 4 * n_embd
    bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    tokenizer: str = "gpt2"  # a built-in tokenizer name, or the path it was loaded from
    extra: dict = field(default_factory=dict)  # family-specific metadata kept on round trips

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"unknown model family {self.family!r}: pocketlm implements {' and '.join(FAMILIES)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise UserError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise UserError("padded_vocab_size must be at least vocab_size")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}: valid keys are {sorted(known)}")
        return cls(**data)


def _gpt2(name: str, n_layer: int, n_head: int, n_embd: int, block_size: int = 1024) -> ModelConfig:
    return ModelConfig(name=name, family="gpt2", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       block_size=block_size)


def _llama(name: str, *, n_layer: int, n_head: int, n_kv_head: int, n_embd: int, intermediate_size: int,
           vocab_size: int, block_size: int, rope_theta: float, tokenizer: str, tie: bool = True,
           norm_eps: float = 1e-5) -> ModelConfig:
    return ModelConfig(name=name, family="llama", vocab_size=vocab_size, block_size=block_size,
                       n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                       intermediate_size=intermediate_size, bias=False, norm_eps=norm_eps,
                       rope_theta=rope_theta, tie_embeddings=tie, tokenizer=tokenizer)


# Named configs. The GPT-2 sizes are OpenAI's; the small ones are sized for a 2-core CPU.
CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _gpt2("gpt2", 12, 12, 768),
        _gpt2("gpt2-medium", 24, 16, 1024),
        _gpt2("gpt2-large", 36, 20, 1280),
        _gpt2("gpt2-xl", 48, 25, 1600),
        _gpt2("gpt2-tiny", 4, 4, 128, block_size=256),  # tests and quick runs
        _gpt2("gpt2-mini", 6, 6, 384, block_size=512),  # the CPU demo size
        _llama("smollm2-135m", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
               vocab_size=49152, block_size=8192, rope_theta=100000.0, tokenizer="smollm2"),
        _llama("smollm2-360m", n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560,
               vocab_size=49152, block_size=8192, rope_theta=100000.0, tokenizer="smollm2"),
        _llama("smollm-135m", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
               vocab_size=49152, block_size=2048, rope_theta=10000.0, tokenizer="smollm2"),
    ]
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in CONFIGS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(CONFIGS)} (see `pocketlm models`)")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 as Hugging Face does, so logits match in every precision."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the output is already in the autocast dtype: the next linear layer would cast
        # it there anyway (same numbers), and what it saves for backward is half the size.
        return ops.rms_norm(x, self.weight, self.eps, autocast_dtype(x.device.type))


def _norm(config: ModelConfig) -> nn.Module:
    if config.family == "llama":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, length: int, device: torch.device | None = None):
    """cos and sin of rotary embeddings, (length, head_dim), in Hugging Face's rotate-half layout."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding in x's dtype, as Hugging Face computes it (bf16 under autocast)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, hd = config.n_embd, config.head_dim
        if config.family == "gpt2":
            self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)
            self.c_proj = nn.Linear(d, d, bias=config.bias)
        else:
            self.q_proj = nn.Linear(d, config.n_head * hd, bias=config.bias)
            self.k_proj = nn.Linear(d, config.kv_heads * hd, bias=config.bias)
            self.v_proj = nn.Linear(d, config.kv_heads * hd, bias=config.bias)
            self.o_proj = nn.Linear(config.n_head * hd, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    # LoRA runs set this (pocketlm.lora.project_together): projections of one input as one matmul, or None.
    project_together = None

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg = self.config
        B, T, _ = x.shape
        if cfg.family == "gpt2":
            q, k, v = self.c_attn(x).split(cfg.n_embd, dim=2)
        else:
            layers = (self.q_proj, self.k_proj, self.v_proj)
            together = self.project_together and self.project_together(x, layers)
            q, k, v = together or [m(x) for m in layers]
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        past = cache.pos if isinstance(cache, KVCache) else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(cache, BatchKVCache):  # rows of different lengths: each sees only its own positions
            mask, causal = cache.step_mask, False
        elif isinstance(cache, StaticKVCache):  # a compiled decode step: every position, the unfilled masked
            mask, causal = cache.mask(), False
        elif past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token sees every cached position
        else:  # a chunk appended to a filled cache: row i sees positions <= past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        dropout = cfg.dropout if self.training else 0.0
        if mask is None and causal and dropout == 0.0:  # training and prefill: the lean op (pocketlm.ops)
            y = ops.attention(q, k, v, causal=True)
        elif isinstance(cache, StaticKVCache):
            y = _one_token_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                               enable_gqa=cfg.kv_heads != cfg.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, cfg.n_head * cfg.head_dim)
        out = self.c_proj(y) if cfg.family == "gpt2" else self.o_proj(y)
        return self.resid_dropout(out)


def _one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row over a StaticKVCache, written as reductions and a softmax that a
    compiled step fuses into its own kernels: q (B, H, 1, D), k and v (B, Hkv, L, D), mask (1, L) bool ->
    (B, H, 1, D), computed in fp32. The q heads sharing a kv head are stacked, so k and v are read once (no GQA
    copies). Against SDPA's flash kernel: an int4 smollm2 token 8% faster on 2 cores (pairs of runs in one
    process), the same greedy tokens."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, rep, D): the heads of a group are consecutive
    # (B, Hkv, rep, 1, D) * (B, Hkv, 1, L, D) summed over D: a reduction inductor fuses, where a bmm this
    # small is an external call that costs more than its arithmetic.
    scores = (qg[:, :, :, None, :].float() * k[:, :, None].float()).sum(-1) * D**-0.5  # (B, Hkv, rep, L)
    p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (p[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype).reshape(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.family = config.family
        d, width = config.n_embd, config.mlp_width
        if config.family == "gpt2":
            self.c_fc = nn.Linear(d, width, bias=config.bias)
            self.c_proj = nn.Linear(width, d, bias=config.bias)
        else:
            self.gate_proj = nn.Linear(d, width, bias=config.bias)
            self.up_proj = nn.Linear(d, width, bias=config.bias)
            self.down_proj = nn.Linear(width, d, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    project_together = None  # as in CausalSelfAttention: gate and up as one matmul in LoRA runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))
        together = self.project_together and self.project_together(x, (self.gate_proj, self.up_proj))
        gate, up = together or (self.gate_proj(x), self.up_proj(x))
        if getattr(self.down_proj, "takes_swiglu_gate", False):  # a LoRA layer: recomputes the product
            return self.dropout(self.down_proj(up, gate=gate))
        return self.dropout(self.down_proj(ops.swiglu(gate, up)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, layer):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class _LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T, computed in row chunks so the (tokens x vocab) logits never
    exist whole; the gradients are computed in the same pass and kept until backward.

    Training needs only the loss. Plain `F.cross_entropy(lm_head(x))` keeps the logits, their
    log-softmax and, in backward, two more tensors of that size: about 1.6 GB in fp32 for GPT-2 at
    batch 8 x 256. Here one chunk of logits (about _LOSS_CHUNK_ELEMENTS values) exists at a time;
    softmax - one_hot of the chunk goes straight into d x (tokens x width) and d weight (fp32, only
    when the head trains). Backward scales them by the incoming gradient. The arithmetic is that of
    the plain path: logits in x's dtype, log-sum-exp and softmax in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grads: bool):
        need_x = with_grads and ctx.needs_input_grad[0]
        need_w = with_grads and ctx.needs_input_grad[1]
        valid = targets != -100
        tgt = targets.masked_fill(~valid, 0)  # ignored rows pick column 0, then count for nothing
        count = valid.sum()
        row_scale = valid.float() / count  # d loss / d (lse - picked) per row; 0/0 = nan if all ignored
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if need_x else None
        dw = torch.empty(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        rows = max(1, min(x.shape[0], _LOSS_CHUNK_ELEMENTS // weight.shape[0]))
        # One set of chunk buffers, reused: fresh tens-of-MB tensors per chunk would each be page-faulted in.
        buffer = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=x.device)
        low = torch.empty_like(buffer, dtype=x.dtype) if x.dtype != torch.float32 else None
        # d weight per chunk in x's dtype, and its fp32 copy (reused: converting into a fresh tensor, or adding
        # bf16 to fp32 in one op, page-faults and converts single-threaded: 2.2x slower for GPT-2's head).
        dw_chunk = torch.empty(weight.shape, dtype=x.dtype, device=x.device) if need_w else None
        dw_chunk32 = dw_chunk if dw_chunk is None or x.dtype == torch.float32 else torch.empty_like(dw)
        for s in range(0, x.shape[0], rows):
            e = min(s + rows, x.shape[0])
            logits = buffer[: e - s]
            if low is None:
                torch.mm(x[s:e], weight.t(), out=logits)
            else:  # the product in x's dtype (bf16 under autocast), then fp32 for the softmax
                logits.copy_(torch.mm(x[s:e], weight.t(), out=low[: e - s]))
            picked = logits.gather(1, tgt[s:e, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: one chunk of fp32 at a time, few passes over it
            sum_exp = exp.sum(dim=-1)
            lse = top.squeeze(1) + sum_exp.log()  # log-sum-exp as torch.logsumexp computes it
            total += torch.where(valid[s:e], lse - picked, 0.0).sum()
            if need_x or need_w:
                # softmax - one_hot = (exp - sum_exp * one_hot) / sum_exp, all in fp32, then one cast into
                # the reused buffer (a mixed-dtype mul with out= is several times slower on CPU).
                exp[torch.arange(e - s, device=x.device), tgt[s:e]] -= sum_exp
                grad = exp.mul_((row_scale[s:e] / sum_exp)[:, None])
                if low is not None:
                    grad = low[: e - s].copy_(grad)
                if need_x:
                    torch.mm(grad, weight, out=dx[s:e])
                if need_w:  # accumulated in fp32 across chunks
                    part = torch.mm(grad.t(), x[s:e], out=dw_chunk)
                    if s == 0:
                        dw.copy_(part)
                    else:
                        dw.add_(part if dw_chunk32 is part else dw_chunk32.copy_(part))
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dx, dw = ctx.saved_tensors
        grad_x = (dx * grad_loss.to(dx.dtype)) if dx is not None else None
        grad_w = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None
        return grad_x, grad_w, None, None


_LOSS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the loss: 64 MB in fp32, efficient matmuls
_SCORE_ROWS = 128  # positions per bf16 chunk of _token_nll: the fastest on CPU for a ~50k vocabulary (32-2048 tried)


def recomputed_blocks(model: nn.Module) -> int:
    """How many blocks (the first ones) recompute in backward: activation_checkpointing True = all, an int
    = that many (pocketlm.recompute picks it from a memory budget), False = none."""
    setting = getattr(model, "activation_checkpointing", False)
    return len(model.transformer.h) if setting is True else int(setting or 0)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.embedding_rows, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=_norm(config),
        )
        if config.family == "gpt2":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.embedding_rows, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.activation_checkpointing: bool | int = False  # set by the trainer: all blocks, or the first N
        self.compiled_blocks: list[nn.Module] | None = None  # compile_blocks(): what training steps run instead
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * layers) so the residual stream's variance
        # does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPT:
        return cls(get_config(name, **overrides))

    @classmethod
    def empty(cls, config: ModelConfig) -> GPT:
        """A model with uninitialised CPU weights, built on the meta device (no random init to throw away):
        for loaders that fill every weight. Tied embeddings are re-tied (to_empty gives the shared meta
        tensor two separate storages)."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu")
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        return model

    def compile_blocks(self) -> None:
        """torch.compile each block for training steps (`--compile-blocks`): graphs with fixed shapes shared by
        the blocks, fusing the norms, activations and casts between the matmuls. Only the training forward runs
        them; evaluation, sampling and recomputed blocks keep the eager blocks, so their other shapes never
        recompile. Machine-dependent on 2 CPU cores: 30-50 s once, then 1.13-1.16x faster LoRA steps or no gain
        (bf16 where the bf16 matmuls dominate), with 16-20% more peak memory (benchmarks/bench_lora.py)."""
        self.compiled_blocks = [torch.compile(block, dynamic=False) for block in self.transformer.h]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied embedding counts once), as Hugging Face counts them."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if self._rope_cache is None or self._rope_cache[0].shape[0] < end or self._rope_cache[0].device != device:
            size = max(end, min(self.config.block_size, 4096))
            self._rope_cache = rope_tables(self.config, size, device)
        cos, sin = self._rope_cache
        return cos[start:end], sin[start:end]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | BatchKVCache | None = None, return_logits: bool = True,
                reduction: str = "mean") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab_size), and the mean cross-entropy if `targets` (-100 = ignore) are given.

        Training passes return_logits=False: the loss then comes from _LMHeadLoss, which never holds
        the whole logits tensor, and the logits returned are None. With return_logits=False and
        reduction="none" the loss is each target's cross-entropy, (B, T) fp32, 0 where ignored, and the
        head runs on the scored positions only (scoring, see _token_nll). With a BatchKVCache, row b of `idx`
        continues the cache's row b, each at its own position (after `cache.feed(counts)`, only the
        first counts[b] tokens of row b are real and its logits are those of the last real one).
        """
        B, T = idx.shape
        batch_cache = isinstance(cache, BatchKVCache)
        if batch_cache and B != cache.rows:
            raise ValueError(f"a BatchKVCache with {cache.rows} rows was given {B} rows of tokens")
        if isinstance(cache, StaticKVCache):
            return self._static_step(idx, cache)
        start = cache.pos if isinstance(cache, KVCache) else 0
        end = (max(cache.lengths) if batch_cache else start) + T
        if end > self.config.block_size:
            raise UserError(
                f"sequence of {end} tokens is longer than the model's context of "
                f"{self.config.block_size}: shorten the prompt or lower --max-new-tokens"
            )
        positions = cache.begin_step(T) if batch_cache else None  # (B, T) per-row positions
        x = self.transformer.wte(idx)
        rope = None
        if self.config.family == "gpt2":
            pos = positions if positions is not None else torch.arange(start, start + T, device=idx.device)
            x = x + self.transformer.wpe(pos)
        elif positions is not None:  # (B, 1, T, head_dim): broadcast over heads
            cos, sin = self._rope(0, end, idx.device)
            rope = cos[positions][:, None], sin[positions][:, None]
        else:
            rope = self._rope(start, T, idx.device)
        x = self.transformer.drop(x)
        training = self.training and torch.is_grad_enabled() and cache is None
        recompute = recomputed_blocks(self) if training else 0
        compiled = self.compiled_blocks if training else None
        for layer, block in enumerate(self.transformer.h):
            if layer < recompute:  # keep only the block's input; run it again in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, layer, use_reentrant=False)
            else:
                x = (compiled[layer] if compiled else block)(x, rope, cache, layer)
        last = None  # a ragged batch step: each row's last real token (else position T - 1)
        if batch_cache:
            last = cache.end_step(T)
        elif cache is not None:
            cache.pos += T
        if targets is None and cache is not None:  # generation needs only the last position's logits
            x = x[:, -1:, :] if last is None else x[torch.arange(B, device=x.device), last][:, None]
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits and reduction == "none":
            return None, self._token_nll(x, targets)
        if targets is not None and not return_logits and type(self.lm_head) is nn.Linear:
            return None, self._chunked_loss(x, targets)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # drop padding rows
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
        return (logits if return_logits else None), loss

    def _static_step(self, idx: torch.Tensor, cache: StaticKVCache) -> tuple[torch.Tensor, None]:
        """forward() for one token per row at `cache.pos`, with shapes that never change (see StaticKVCache):
        what a decode step compiled once runs. The caller checks that the positions fit (generate.check_fits)."""
        B, T = idx.shape
        if T != 1:
            raise ValueError(f"a StaticKVCache step takes one token per row, got {T}")
        x = self.transformer.wte(idx)  # (B, 1, n_embd)
        rope = None
        if self.config.family == "gpt2":
            x = x + self.transformer.wpe(cache.pos)
        else:  # tables covering max_len (usually built by the prefill), the row at pos: (1, head_dim)
            cos, sin = self._rope(0, cache.max_len, idx.device)
            rope = cos.index_select(0, cache.pos), sin.index_select(0, cache.pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer)
        cache.pos.add_(1)
        return self.lm_head(self.transformer.ln_f(x))[..., : self.config.vocab_size], None

    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """lm_head + cross-entropy through _LMHeadLoss: the same numbers as the plain path, less memory."""
        x, weight = self._head_operands(x)
        with torch.autocast(x.device.type, enabled=False):
            return _LMHeadLoss.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1),
                                     torch.is_grad_enabled())

    def _head_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x and the plain head's weight without padding rows, cast as autocast would cast lm_head's inputs."""
        weight = self.lm_head.weight
        if weight.shape[0] > self.config.vocab_size:  # padding rows never become logits
            weight = weight[: self.config.vocab_size]
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            return x.to(dtype), weight.to(dtype)
        return (x if x.dtype == weight.dtype else x.to(weight.dtype)), weight

    @torch.no_grad()
    def _token_nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each target's cross-entropy, (B, T) fp32 (0 where the target is -100), without the whole logits.

        Scoring with windows that overlap needs the head only where a token is scored, and never the
        (tokens x vocab) logits at once: they are computed a chunk of rows at a time into one reused
        buffer (in the head's dtype) and its fp32 copy. On 2 CPU cores, for smollm2's head in bf16, that
        is 1.5x faster than whole logits, .float() and F.cross_entropy (the chunks stay cache-warm and
        nothing is page-faulted in per call); in fp32 1.05x. The arithmetic is the same: logits in the
        compute dtype, log-softmax in fp32.
        """
        flat = x.reshape(-1, x.shape[-1])
        tgt = targets.reshape(-1)
        nll = torch.zeros(tgt.shape, dtype=torch.float32, device=x.device)
        scored = (tgt != -100).nonzero().squeeze(1)
        if scored.numel() == 0:
            return nll.view(targets.shape)
        vocab = self.config.vocab_size
        plain = type(self.lm_head) is nn.Linear and self.lm_head.bias is None  # else the module runs per chunk
        if plain:
            flat, weight = self._head_operands(flat)
        rows = _SCORE_ROWS if flat.dtype != torch.float32 else 4 * _SCORE_ROWS  # fp32 GEMMs want more rows
        rows = min(scored.numel(), rows * (16 if x.device.type == "cuda" else 1))
        high = torch.empty(rows, vocab, dtype=torch.float32, device=x.device)
        low = torch.empty_like(high, dtype=flat.dtype) if plain and flat.dtype != torch.float32 else high
        for s in range(0, scored.numel(), rows):
            index = scored[s:s + rows]
            n = index.numel()
            if plain:
                with torch.autocast(x.device.type, enabled=False):
                    logits = torch.mm(flat[index], weight.t(), out=low[:n])
                if low is not high:
                    logits = high[:n].copy_(logits)
            else:
                logits = self.lm_head(flat[index])[:, :vocab].float()
            nll[index] = F.cross_entropy(logits, tgt[index], reduction="none")
        return nll.view(targets.shape)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.transformer.wte.weight
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype)

    def new_batch_cache(self) -> BatchKVCache:
        p = self.transformer.wte.weight
        return BatchKVCache(self.config, p.device, p.dtype if p.is_floating_point() else torch.float32)


def list_models() -> list[dict]:
    """`pocketlm models`: every named config with its exact parameter count (a tied embedding once, as
    Hugging Face counts), built on the meta device: shapes only, no memory, no initialisation cost."""
    rows = []
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):
            params = GPT(cfg).num_parameters()
        rows.append({
            "name": name, "family": cfg.family, "layers": cfg.n_layer, "heads": cfg.n_head,
            "kv_heads": cfg.kv_heads, "width": cfg.n_embd, "context": cfg.block_size,
            "vocab": cfg.vocab_size, "parameters": params, "tokenizer": cfg.tokenizer,
        })
    return rows
