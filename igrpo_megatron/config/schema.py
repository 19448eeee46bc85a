"""The whole recipe: one typed object that flows from the command line to every part.

Sections are declared next to the settings they describe (``config/model.py``,
``config/algorithm.py``, ...); this module only puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass

from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.evaluation import EvaluationConfig
from igrpo_megatron.config.fields import param
from igrpo_megatron.config.layout import layout_errors
from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.config.reward import RewardConfig
from igrpo_megatron.config.rollout import RolloutConfig
from igrpo_megatron.config.training import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    TrainerConfig,
)


@dataclass
class RunConfig:
    """Identity of a run: its name, seed and where its files go."""

    name: str = param("igrpo", help="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = param("runs", help="Parent directory of run directories.")
    seed: int = param(1234, help="Seed for data order, initialisation and sampling.")
    cpu_threads: int | None = param(None, help="torch intra-op threads per trainer rank when running on CPU "
                                               "(the vLLM sidecar shares the cores: 1 avoids thrashing on small "
                                               "machines). null: torch's default. Ignored with GPUs.")
    tags: dict[str, str] = param(default_factory=dict, help="Free-form labels, written to summary.md, to the "
                                                            "W&B run tags and to TensorBoard (run/tags). Add with "
                                                            "+run.tags.KEY=VALUE.")

    def errors(self, prefix: str = "run") -> list[str]:
        """Every rule this section breaks (empty when valid)."""
        errs = [] if self.name.strip() else [f"{prefix}.name is empty: the run directory is <output_dir>/<name>."]
        if self.cpu_threads is not None and self.cpu_threads < 1:
            errs.append(f"{prefix}.cpu_threads = {self.cpu_threads}: must be >= 1, or null for torch's default.")
        return errs


@dataclass
class RecipeConfig:
    """Every setting of a training or evaluation run."""

    run: RunConfig = param(default_factory=RunConfig, help="Name, seed, output directory.")
    model: ModelConfig = param(default_factory=ModelConfig, help="Policy architecture and sizes.")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, help="TP/PP/CP/DP layout.")
    optimizer: OptimizerConfig = param(default_factory=OptimizerConfig, help="AdamW and LR schedule.")
    trainer: TrainerConfig = param(default_factory=TrainerConfig, help="Steps, batch sizes, cadence.")
    algorithm: AlgorithmConfig = param(default_factory=AlgorithmConfig, help="Advantages, loss, iGRPO.")
    rollout: RolloutConfig = param(default_factory=RolloutConfig, help="vLLM sidecar and sampling.")
    reward: RewardConfig = param(default_factory=RewardConfig, help="Math, format and judge rewards.")
    data: DataConfig = param(default_factory=DataConfig, help="Prompt datasets and field names.")
    evaluation: EvaluationConfig = param(default_factory=EvaluationConfig,
                                         help="Benchmarks, pass@k, test-time refinement, training hook.")
    checkpoint: CheckpointConfig = param(default_factory=CheckpointConfig, help="Saving and resuming.")
    logging: LoggingConfig = param(default_factory=LoggingConfig, help="Metrics and log output.")
    cluster: ClusterConfig = param(default_factory=ClusterConfig, help="Nodes and Slurm settings.")

    def errors(self) -> list[str]:
        """Rules that span sections: the parallel layout must fit the model (see config/layout.py), the
        overlong penalty's buffer the rollout's completion budget."""
        return (layout_errors(self.model, self.parallel)
                + self.algorithm.overlong_penalty.errors(self.rollout.sampling.max_tokens))
