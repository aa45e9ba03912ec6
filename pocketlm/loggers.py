"""Where training metrics go: RUN/metrics.jsonl always (the record), TensorBoard and Weights & Biases when
asked (`tensorboard: true`, `wandb_project: NAME`), each through its official library and neither required.
"""

from __future__ import annotations

from pocketlm.errors import UserError
from pocketlm.rundir import RunDir


class MetricLoggers:
    """Fan one metrics row out to every enabled sink. Rank 0 only (RunDir.is_main)."""

    def __init__(self, run: RunDir, *, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None) -> None:
        self.run = run
        self.tensorboard = None
        self.wandb = None
        if not run.is_main:
            return
        if tensorboard:
            self.tensorboard = _tensorboard_writer(run)
        if wandb_project:
            self.wandb = _wandb_run(run, wandb_project, config or {})

    def log(self, row: dict) -> None:
        self.run.log(row)
        step = row.get("step")
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard_writer(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install 'pocketlm[logging]'), or leave --tensorboard off") from exc
    return SummaryWriter(log_dir=str(run.tensorboard_dir))


def _wandb_run(run: RunDir, project: str, config: dict):
    try:
        import wandb
    except ImportError as exc:
        raise UserError("--wandb-project needs the wandb package: pip install wandb "
                        "(or pip install 'pocketlm[logging]'), or leave --wandb-project unset") from exc
    # resume="allow" with the run directory's name as id: a resumed pocketlm run continues the same W&B run.
    return wandb.init(project=project, name=run.path.name, dir=str(run.path), config=config,
                      id=_wandb_id(run), resume="allow")


def _wandb_id(run: RunDir) -> str:
    import hashlib

    return hashlib.sha256(str(run.path.resolve()).encode()).hexdigest()[:16]
