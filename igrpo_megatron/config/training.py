"""Recipe sections for the optimizer, the training loop, data, checkpoints, logging and the cluster."""

from __future__ import annotations

from dataclasses import dataclass

from igrpo_megatron.config.fields import param


@dataclass
class OptimizerConfig:
    """AdamW through Megatron's (distributed) optimizer, with a cosine schedule."""

    lr: float = param(1e-6, help="Peak learning rate (paper: 1e-6).")
    min_lr_ratio: float = param(0.1, help="Cosine floor as a fraction of lr (paper: 0.1).")
    warmup_fraction: float = param(0.1, help="Fraction of the optimizer steps spent in linear warm-up "
                                             "(paper: 0.1). 0 disables warm-up.")
    weight_decay: float = param(0.01, help="Decoupled weight decay. 0 disables it.")
    adam_beta1: float = param(0.9, help="Adam beta1.")
    adam_beta2: float = param(0.999, help="Adam beta2.")
    adam_eps: float = param(1e-8, help="Adam epsilon.")
    clip_grad: float = param(1.0, help="Clip the global gradient norm to this value. 0 disables clipping.")

    def errors(self, prefix: str = "optimizer") -> list[str]:
        """Every rule this section breaks, each naming the key (empty when valid)."""
        errs = _at_least(self, prefix, 0.0, "lr", "weight_decay", "clip_grad", "adam_eps")
        for key in ("min_lr_ratio", "warmup_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                errs.append(f"{prefix}.{key} = {getattr(self, key)}: must be in [0, 1].")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                errs.append(f"{prefix}.{key} = {getattr(self, key)}: must be in [0, 1).")
        return errs


@dataclass
class WarmStartConfig:
    """A short supervised warm-start on worked solutions before RL (tiny recipe: so rewards are not all 0)."""

    enabled: bool = param(False, help="Run supervised steps on the synthetic task's worked solutions before "
                                      "RL. Needs data.synthetic_task. false: start RL from the model as it is.")
    steps: int = param(300, help="Supervised optimizer steps.")
    batch_size: int = param(32, help="Worked solutions per supervised step.")
    lr: float = param(1e-3, help="Peak learning rate of the warm-start (cosine to 0.1x, 5% warm-up).")
    num_examples: int = param(4000, help="Distinct training problems generated for the warm-start.")
    refinement_fraction: float = param(0.0, help="Share of warm-start examples shown as draft-conditioned "
                                                 "prompts (a draft from another problem, or the right one), so a "
                                                 "random model learns to read a draft. 0: plain prompts only.")

    def errors(self, prefix: str = "trainer.warmstart") -> list[str]:
        """Every rule this section breaks (checked only when the warm-start is enabled)."""
        if not self.enabled:
            return []
        errs = _at_least(self, prefix, 1, "steps", "batch_size", "num_examples")
        errs += _at_least(self, prefix, 0.0, "lr")
        if not 0 <= self.refinement_fraction <= 1:
            errs.append(f"{prefix}.refinement_fraction = {self.refinement_fraction}: must be in [0, 1].")
        return errs


@dataclass
class TrainerConfig:
    """Sizes and counts of the RL loop."""

    num_steps: int = param(100, help="RL steps (one rollout batch each).")
    prompts_per_step: int = param(8, help="Prompts per rollout batch (the group count per step).")
    optimizer_steps_per_rollout: int = param(1, help="Optimizer steps taken on each rollout batch "
                                                     "(the batch is split into this many mini-batches).")
    micro_batch_tokens: int = param(4096, help="Token budget of one micro-batch (sequences are packed "
                                               "up to it), not a sample count.")
    eval_every: int = param(0, help="Run the held-out evaluation hook every N steps. 0 disables it.")
    save_every: int = param(0, help="Save a checkpoint every N steps (and at the end). 0: only at the end.")
    stop_after_steps: int | None = param(None, help="Stop (saving a checkpoint, as if preempted) after this many "
                                                    "steps of this invocation; the schedule still spans num_steps. "
                                                    "For time-boxed jobs and resume tests. null: run to num_steps.")
    max_consecutive_bad_steps: int = param(
        3, help="A step whose loss or gradient norm is NaN/Inf skips its optimizer update (counted as "
                "faults/bad_steps in the metrics; weights and optimizer state stay those of the last good step). "
                "This many bad steps in a row stop the run with an error, after saving a checkpoint of the last "
                "good state. 0: never stop (every bad step is still skipped).")
    warmstart: WarmStartConfig = param(default_factory=WarmStartConfig, help="Supervised warm-start before RL.")

    def errors(self, prefix: str = "trainer") -> list[str]:
        """Every rule this section breaks, each naming the key and the fix (empty when valid)."""
        errs = _at_least(self, prefix, 1, "num_steps", "prompts_per_step", "optimizer_steps_per_rollout",
                         "micro_batch_tokens")
        errs += _at_least(self, prefix, 0, "eval_every", "save_every", "max_consecutive_bad_steps")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            errs.append(f"{prefix}.stop_after_steps = {self.stop_after_steps}: must be >= 1, or null to run to "
                        f"{prefix}.num_steps.")
        if self.optimizer_steps_per_rollout > self.prompts_per_step >= 1:
            errs.append(f"{prefix}.optimizer_steps_per_rollout = {self.optimizer_steps_per_rollout} is more than "
                        f"{prefix}.prompts_per_step = {self.prompts_per_step}: each optimizer step needs at least "
                        "one prompt's group.")
        return errs + self.warmstart.errors(f"{prefix}.warmstart")


@dataclass
class DataConfig:
    """Where prompts come from and which fields hold the problem and its answer."""

    train_path: str | None = param(None, help="JSONL or Parquet file of training prompts. null: the "
                                              "recipe's synthetic task generates them.")
    eval_path: str | None = param(None, help="Held-out prompts (same format). null: none / synthetic.")
    problem_field: str = param("problem", help="Column holding the problem text.")
    answer_field: str = param("answer", help="Column holding the reference answer.")
    id_field: str = param("id", help="Column holding a row's id: a row repeating an earlier row's id is skipped "
                                     "(or an error with data.strict). Rows without the column are not checked.")
    synthetic_task: str | None = param(None, help="Name of a built-in generated task used when train_path is "
                                                  "null: 'arithmetic' (1-3 operations) or 'arithmetic_chain' "
                                                  "(4-6 operations, where a draft helps a refinement; "
                                                  "data/synthetic.py, docs/learning.md).")
    synthetic_options: dict[str, int] = param(default_factory=dict, help="Settings of the synthetic task "
                                              "(arithmetic: min_steps, max_steps, max_operand, max_start, "
                                              "slip_percent per solution; arithmetic_chain: the same with "
                                              "slip_percent per computed line, plus max_value, max_multiplier).")
    synthetic_train_size: int = param(2000, help="Training problems generated for the synthetic task.")
    tokenizer_vocab_size: int = param(512, help="Vocabulary of the tokenizer the recipe trains itself "
                                                "(synthetic task without tokenizer_path); = model.vocab_size.")
    prompt_template: str = param(
        "{problem}\nThink step by step inside <think></think>, then give the final answer inside "
        "<answer></answer>.",
        help="User message built from a problem ({problem} is replaced). The answer format it asks for "
             "must match reward.extraction / reward.format.")
    system_prompt: str | None = param(None, help="System message put before every prompt; null: none.")
    use_chat_template: bool = param(True, help="Wrap prompts with the tokenizer's chat template (with the "
                                               "generation prompt). false: the raw text is the prompt.")
    max_prompt_length: int = param(1024, help="Longest prompt in tokens, draft included (paper: 1024).")
    shuffle: bool = param(True, help="Shuffle prompts each epoch (deterministic by seed and epoch).")
    strict: bool = param(False, help="A bad training row (no problem or answer, empty text, a duplicate id, a "
                                     "prompt longer than max_prompt_length) stops the run before training, "
                                     "naming the file and line. false: such rows are skipped with a warning "
                                     "naming them and counted (data/skipped_rows in the step metrics).")
    tokenizer_path: str | None = param(None, help="Hugging Face tokenizer directory; null: the model's "
                                                  "hf_path, or the tokenizer the tiny recipe trains.")

    def errors(self, prefix: str = "data") -> list[str]:
        """Every rule this section breaks, each naming the key (empty when valid)."""
        errs = _at_least(self, prefix, 1, "synthetic_train_size", "tokenizer_vocab_size", "max_prompt_length")
        for key in ("problem_field", "answer_field"):
            if not getattr(self, key).strip():
                errs.append(f"{prefix}.{key} is empty: name the column that holds it.")
        if self.prompt_template.count("{problem}") != 1:
            errs.append(f"{prefix}.prompt_template must contain {{problem}} exactly once "
                        f"(found {self.prompt_template.count('{problem}')}).")
        return errs


@dataclass
class CheckpointConfig:
    """Megatron distributed checkpoints (re-shardable) plus the loop's own state."""

    save_dir: str | None = param(None, help="Where checkpoints go; null: <run_dir>/checkpoints.")
    resume: str = param("auto", help="'auto': continue from the newest complete checkpoint if any; "
                                     "'none': start fresh; or a path to one checkpoint.")
    keep_last: int = param(2, help="Keep this many newest checkpoints (0 keeps all).")

    def errors(self, prefix: str = "checkpoint") -> list[str]:
        """Every rule this section breaks (empty when valid)."""
        errs = _at_least(self, prefix, 0, "keep_last")
        if not self.resume.strip():
            errs.append(f"{prefix}.resume is empty: use 'auto', 'none' or a checkpoint directory.")
        return errs


@dataclass
class LoggingConfig:
    """Where metrics go. Rank 0 writes them."""

    log_every: int = param(1, help="Print the progress line (reward, loss, entropy, time per step) every N steps and "
                                   "at the last one; metrics.jsonl, TensorBoard and W&B still get every step.")
    tensorboard: bool = param(True, help="Write TensorBoard event files under <run_dir>/tensorboard.")
    wandb_project: str | None = param(None, help="Weights & Biases project; null disables W&B.")

    def errors(self, prefix: str = "logging") -> list[str]:
        """Every rule this section breaks (empty when valid)."""
        return _at_least(self, prefix, 1, "log_every")


@dataclass
class ClusterConfig:
    """How the job is laid out on machines (read by launchers and the sbatch scripts)."""

    nodes: int = param(1, help="Trainer nodes.")
    gpus_per_node: int = param(8, help="GPUs (ranks) per trainer node. On CPU: ranks per machine.")
    rollout_nodes: int = param(0, help="Nodes for the vLLM sidecar group (0: share the trainer's node).")
    gpu_memory_gb: float | None = param(
        None, help="Memory of one GPU in GiB (80 for H100 80GB, 141 for H200). `igrpo plan` and the start of "
                   "training refuse a recipe whose estimated trainer or sidecar memory per GPU exceeds it. "
                   "null: no GPU (CPU runs) or unknown; the fit is not checked.")
    partition: str | None = param(None, help="Slurm partition; null: the cluster default.")
    account: str | None = param(None, help="Slurm account; null: none.")
    time_limit: str = param("04:00:00", help="Slurm time limit per job (requeued jobs resume).")
    container_image: str | None = param(None, help="Container image for srun --container-image; null: "
                                                   "run on the host environment.")

    def errors(self, prefix: str = "cluster") -> list[str]:
        """Every rule this section breaks (empty when valid)."""
        return _at_least(self, prefix, 1, "nodes", "gpus_per_node") + _at_least(self, prefix, 0, "rollout_nodes")


def _at_least(section: object, prefix: str, low: float, *keys: str) -> list[str]:
    """One message per field of ``section`` among ``keys`` whose value is below ``low``."""
    return [f"{prefix}.{k} = {getattr(section, k)}: must be >= {low}." for k in keys if getattr(section, k) < low]
