"""The one rank-0 metrics logger: metrics.jsonl (always), TensorBoard and W&B (when configured).

The run's ``run.tags`` become W&B run tags and a TensorBoard text entry (``run/tags``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from igrpo_megatron.config.files import write_text
from igrpo_megatron.config.training import LoggingConfig

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON line per step and mirrors scalars to TensorBoard / W&B."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, run_name: str, recipe_dict: dict | None = None,
                 tags: dict[str, str] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            if tags:
                self._tb.add_text("run/tags", ", ".join(f"{k}={v}" for k, v in tags.items()), 0)
        if cfg.wandb_project:
            import wandb  # optional: only when the recipe asks for it

            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, config=recipe_dict or {},
                                     tags=[f"{k}={v}" for k, v in (tags or {}).items()] or None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                  for k, v in clean.items()}}) + "\n")
        scalars = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps > ``step`` (a resumed run re-logs them)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def history(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
