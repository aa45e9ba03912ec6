"""torch.distributed set-up for `torchrun`: one process per device, NCCL on GPUs, gloo on CPU.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single process.

Two ways to spread a model over ranks:
- DDP (default): every rank holds the whole model; gradients are averaged once per optimizer step.
- FSDP2 (`--fsdp`, torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer state are
  sharded across ranks; each transformer block is gathered just before it runs.
Checkpoints are always written in the single-process format (a full model folder and an optimizer
state keyed by parameter index), so a run resumes on any number of ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import itertools
import os
import signal
import sys
import warnings
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from pocketlm.device import pick_device
from pocketlm.errors import UserError

# How long a rank waits in a collective for the others. Long enough for a first-step torch.compile or a
# large checkpoint save on rank 0; a rank that dies is noticed much sooner (torchrun stops the others).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "POCKETLM_DIST_TIMEOUT_S"


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError as exc:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds: unset it or give e.g. 600") from exc
    if seconds <= 0:
        raise UserError(f"{TIMEOUT_ENV} must be positive, got {raw}")
    return timedelta(seconds=seconds)


def init_distributed(device_request: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes, and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), pick_device(device_request)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}): "
                            "lower --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise UserError("torchrun with several processes needs --device cuda or --device cpu (MPS has no "
                        "collective backend)")
    if not dist.is_initialized():
        if device.type == "cuda":  # device_id binds the communicator to this rank's GPU up front
            dist.init_process_group(backend="nccl", timeout=_timeout(), device_id=device)
        else:
            dist.init_process_group(backend="gloo", timeout=_timeout())
        _install_shutdown()
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank), device


def _install_shutdown() -> None:
    """Leave the process group on any exit, and turn torchrun's SIGTERM into a normal exit.

    When one rank fails, torchrun sends SIGTERM to the others. As SystemExit, it unwinds the stack, so a
    checkpoint being written is discarded by AtomicDir (never left half-written) and the group is left.
    """
    atexit.register(shutdown_distributed)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
            print(f"rank {os.environ.get('RANK', '?')}: stopped by SIGTERM (another rank failed?)", file=sys.stderr)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _on_sigterm)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway: a broken group must not mask the real error
            dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def accumulation_steps(batch_tokens: int, context: int, micro_batch: int, world: int) -> int:
    """Micro-batches per rank per optimizer step, so that the global batch is batch_tokens on any world size."""
    unit = context * micro_batch * world
    if batch_tokens % unit:
        ranks = f" x {world} ranks" if world > 1 else ""
        raise UserError(
            f"batch-tokens {batch_tokens} is not divisible by context {context} x micro-batch {micro_batch}"
            f"{ranks} = {unit}: use a multiple of {unit} (e.g. --batch-tokens {max(unit, batch_tokens // unit * unit)})"
        )
    return batch_tokens // unit


# -- wrapping ---------------------------------------------------------------------------------------
_FULL_TEMPLATES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def wrap_for_distributed(model: nn.Module, cfg, d: Dist, device: torch.device) -> nn.Module:
    """DDP (every rank holds the whole model) or, with cfg.fsdp, FSDP2 (parameters sharded across ranks)."""
    if getattr(cfg, "fsdp", False):
        return _fully_shard(model, d, device)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # forward_sync_buffers=False: our buffers (NF4 codes, scales) are identical on every rank and never change,
    # so re-sending them every forward would only cost time. Only trainable parameters are synchronised,
    # so frozen LoRA/QLoRA bases need no find_unused_parameters.
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                   gradient_as_bucket_view=True)


def _fully_shard(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A parameter-free copy of the unsharded structure: checkpoints rebuild a plain model from it on rank 0,
    # so any WeightSaver (full model, LoRA adapter) sees the same kind of module as in a single process.
    _FULL_TEMPLATES[model] = _meta_copy(model)
    # Like DDP, start every rank from rank 0's weights: fully_shard keeps each rank's own slice, so a
    # rank-dependent initialisation (e.g. an unseeded LoRA A) would otherwise mix silently.
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (d.world_size,))
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    for block in blocks if blocks is not None else []:
        fully_shard(block, mesh=mesh)  # one all-gather per block: memory ~ one block at a time
    fully_shard(model, mesh=mesh)  # the rest: embeddings (tied with lm_head), final norm
    # The logits are a view (padding rows cut off); the loop never edits them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def _meta_copy(model: nn.Module) -> nn.Module:
    """model's module structure with every parameter and buffer on the meta device (no memory)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 model: every rank must then take part in each forward pass (and in saving)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_sync(forward: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step (no_sync).

    FSDP2 reduce-scatters every micro-batch: keeping unsharded gradients around would undo its memory savings.
    """
    if last_micro_batch or not hasattr(forward, "no_sync"):
        return contextlib.nullcontext()
    return forward.no_sync()


# -- checkpoints ------------------------------------------------------------------------------------
def _param_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _optimizer_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """For optimizer parameter index i (the single-process state_dict key), every name of that parameter."""
    names = _param_names(model)
    params = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
    return [names[id(p)] for p in params]


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module | None, dict | None]:
    """(a plain model, the optimizer state) to write, in the single-process format.

    For FSDP2 this gathers full tensors to CPU on rank 0 and must be called on every rank; the other ranks
    get (None, None). For DDP or a single process it is (model, optimizer.state_dict()).
    """
    if not is_sharded(model):
        return model, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    plain = copy.deepcopy(_FULL_TEMPLATES[model])
    for name, buffer in model.named_buffers():  # buffers are not sharded; non-persistent ones are not in `full`
        plain.get_submodule(name.rpartition(".")[0]).register_buffer(
            name.rpartition(".")[2], buffer.detach().cpu(), persistent=name in full)
    plain.load_state_dict(full, strict=True, assign=True)
    if getattr(getattr(plain, "config", None), "tie_embeddings", False):  # assign=True unties: tie again
        plain.lm_head.weight = plain.transformer.wte.weight
    return plain, _fqn_to_index(optim, _optimizer_fqns(model, optimizer))


def _fqn_to_index(optim: dict, fqns: list[list[str]]) -> dict:
    index = {name: i for i, names in enumerate(fqns) for name in names}
    return {
        "state": {index[name]: value for name, value in optim["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in optim["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Restore an optimizer state saved by `checkpoint_state` (by any world size, with or without FSDP2)."""
    if not is_sharded(model):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    fqns = [names[0] for names in _optimizer_fqns(model, optimizer)]
    by_name = {
        "state": {fqns[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
