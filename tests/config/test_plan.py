"""``igrpo plan``: every shipped recipe passes with stand-in paths, sizes match hand arithmetic,
and each problem the plan refuses names its key; the training loop refuses the same recipe first."""

import json
from pathlib import Path

import pytest

from igrpo_megatron.cli import main
from igrpo_megatron.config import load_recipe
from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.config.plan import PlanError, check_plan, make_plan
from igrpo_megatron.config.sizing import GIB, count_parameters, parameters_per_rank, state_memory

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))

# Architecture numbers from the models' Hugging Face config.json files:
# Qwen/Qwen2.5-7B (also DeepSeek-R1-Distill-Qwen-7B and OpenReasoning-Nemotron-7B): hidden_size 3584,
# intermediate_size 18944, num_hidden_layers 28, num_attention_heads 28, num_key_value_heads 4,
# vocab_size 152064, tie_word_embeddings false (head size 3584 / 28 = 128; bias on q, k, v only).
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}
# nvidia/Nemotron-H-8B-Base-8K: hidden_size 4096, intermediate_size 21504, num_attention_heads 32,
# num_key_value_heads 8, head_dim 128, mamba_num_heads 128, mamba_head_dim 64, ssm_state_size 128,
# n_groups 8, conv_kernel 4, use_conv_bias true, mamba_proj_bias false, vocab_size 131072,
# tie_word_embeddings false, hybrid_override_pattern below (52 layers: 24 M, 4 *, 24 -).
NEMOTRON_H_8B = {"hidden_size": 4096, "intermediate_size": 21504, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "mamba_num_heads": 128, "mamba_head_dim": 64,
                 "ssm_state_size": 128, "n_groups": 8, "vocab_size": 131072,
                 "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """Files the GPU recipes read: a checkpoint directory, training prompts, the built-in eval files."""
    monkeypatch.delenv("IGRPO_EVAL_DATA_DIR", raising=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(QWEN25_7B))
    (ckpt / "tokenizer.json").write_text("{}")
    row = json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n"
    (tmp_path / "train.jsonl").write_text(row)
    (tmp_path / "eval").mkdir()
    for name in ("math500", "aime24"):
        (tmp_path / "eval" / f"{name}.jsonl").write_text(row)
    return [f"model.hf_path={ckpt}", f"data.train_path={tmp_path / 'train.jsonl'}",
            f"evaluation.data_dir={tmp_path / 'eval'}"]


def _overrides(name: str, stand_ins: list[str]) -> list[str]:
    if name.startswith("tiny_"):
        return []  # synthetic task, tokenizer and weights made by the run itself
    return stand_ins + (["reward.judge.url=http://judge:8001"] if "judge" in name else [])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_passes_the_plan(name, stand_ins):
    recipe = load_recipe(RECIPES / name, _overrides(name, stand_ins))
    plan = check_plan(recipe)
    assert plan.errors == []
    if recipe.cluster.gpu_memory_gb is not None:  # planned for GPUs: its header names them
        assert "H100" in (RECIPES / name).read_text().split("defaults:")[0]
        assert plan.peak_gib() <= plan.trainer_budget_gib
        assert plan.sidecar.full_length_sequences >= 1


def test_qwen25_7b_parameter_count_against_hand_arithmetic():
    c = QWEN25_7B
    h, f, layers, a, g, v = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                             c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"])
    d = h // a                                    # 128
    qkv = h * (a * d + 2 * g * d) + (a * d + 2 * g * d)  # 3584 x 4608 weights + 4608 bias = 16,519,680
    attention = qkv + a * d * h                   # + o_proj 3584 x 3584 = 29,364,736 per layer
    mlp = 3 * h * f                               # gate, up, down = 203,685,888 per layer
    norms = 2 * h * layers + h                    # two RMSNorms per layer + the final one
    total = v * h * 2 + layers * (attention + mlp) + norms
    assert total == 7_615_616_512                 # "7.61B" on the model card
    model = load_recipe(RECIPES / "r1_distill_qwen_7b_igrpo.yaml", ["model.hf_path=/x", "data.train_path=/y"]).model
    counted = count_parameters(model)
    assert counted.total == total
    assert (counted.attention, counted.mlp, counted.embedding, counted.output) == (
        layers * attention, layers * mlp, v * h, v * h)


def test_nemotron_h_8b_parameter_count_against_hand_arithmetic():
    c = NEMOTRON_H_8B
    h, f, v, pattern = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hybrid_override_pattern"]
    nh, hd, ds, ng = c["mamba_num_heads"], c["mamba_head_dim"], c["ssm_state_size"], c["n_groups"]
    di = nh * hd                                  # 8192
    conv = di + 2 * ng * ds                       # 10,240 channels (x, B, C)
    mamba = (h * (2 * di + 2 * ng * ds + nh)      # in_proj: z, x, B, C, dt = 4096 x 18,560
             + conv * 4 + conv                    # depthwise conv1d, kernel 4, with bias
             + 3 * nh                             # dt_bias, A_log, D
             + di                                 # gated RMSNorm
             + di * h)                            # out_proj
    attention = h * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * c["head_dim"] + h * h
    mlp = 2 * h * f                               # squared ReLU: up and down, no gate
    counts = {k: pattern.count(k) for k in "M*-"}
    assert counts == {"M": 24, "*": 4, "-": 24}
    total = (2 * v * h + counts["M"] * mamba + counts["*"] * attention + counts["-"] * mlp
             + len(pattern) * h + h)              # one RMSNorm per layer + the final one
    assert total == 8_100_852_736
    model = load_recipe(RECIPES / "nemotron_h_8b_igrpo.yaml", ["model.hf_path=/x", "data.train_path=/y"]).model
    counted = count_parameters(model)
    assert counted.total == total
    assert (counted.mamba, counted.attention, counted.mlp) == (24 * mamba, 4 * attention, 24 * mlp)


def test_tensor_and_pipeline_split_and_the_bytes_per_parameter():
    model = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, vocab_size=256, add_qkv_bias=False)
    full = count_parameters(model).total
    one = parameters_per_rank(model, ParallelConfig())
    assert one == [full]
    # TP=2: every matrix halves, the 2 norms per layer and the final norm (64 each) do not.
    norms = (2 * 4 + 1) * 64
    assert parameters_per_rank(model, ParallelConfig(tensor_model_parallel_size=2)) == [(full - norms) // 2 + norms]
    # PP=2: two layers each; the embedding on the first stage, final norm + output layer on the last.
    stages = parameters_per_rank(model, ParallelConfig(pipeline_model_parallel_size=2))
    assert sum(stages) == full and stages[0] - stages[1] == -64
    # bf16 with the distributed optimizer over 4 ranks: 2 + 4 + 12/4 = 9 bytes per parameter; without: 18.
    assert state_memory(1000, "bfloat16", 4, True).total == 9000
    assert state_memory(1000, "bfloat16", 4, False).total == 18000
    assert state_memory(1000, "float32", 1, False).total == 16000  # fp32 params are their own main copy


def _errors(name, stand_ins, *more):
    return make_plan(load_recipe(RECIPES / name, [*_overrides(name, stand_ins), *more])).errors


def test_heldout_hook_without_eval_data_names_the_keys(stand_ins):
    errs = _errors("r1_distill_qwen_7b_igrpo.yaml", stand_ins, "evaluation.hook.benchmarks=[heldout]")
    assert len(errs) == 1 and "data.eval_path" in errs[0] and "trainer.eval_every" in errs[0]
    assert _errors("r1_distill_qwen_7b_igrpo.yaml", stand_ins, "evaluation.hook.benchmarks=[heldout]",
                   "trainer.eval_every=0") == []


def test_missing_files_name_their_keys(stand_ins, tmp_path):
    errs = _errors("nemotron_h_8b_igrpo.yaml", stand_ins, f"data.train_path={tmp_path / 'none.jsonl'}",
                   f"data.tokenizer_path={tmp_path / 'no-tokenizer'}", f"evaluation.data_dir={tmp_path}")
    text = "\n".join(errs)
    for key in ("data.train_path", "data.tokenizer_path", "evaluation.data_dir"):
        assert key in text, text


def test_layout_and_world_size_errors_name_the_keys(stand_ins):
    errs = _errors("r1_distill_qwen_7b_igrpo.yaml", stand_ins, "cluster.gpus_per_node=3")
    assert any("world size 3" in e and "parallel.tensor_model_parallel_size" in e for e in errs), errs
    errs = _errors("r1_distill_qwen_7b_igrpo.yaml", stand_ins, "rollout.server.tensor_parallel_size=3")
    assert any(e.startswith("rollout.server.tensor_parallel_size = 3") for e in errs), errs
    errs = _errors("r1_distill_qwen_7b_igrpo.yaml", stand_ins, "rollout.server.data_parallel_size=16")
    assert any("cluster.rollout_nodes x cluster.gpus_per_node = 8" in e for e in errs), errs


def test_memory_that_does_not_fit_names_the_keys(stand_ins):
    errs = _errors("nemotron_h_8b_igrpo.yaml", stand_ins, "trainer.micro_batch_tokens=32768")
    assert len(errs) == 1
    assert "trainer.micro_batch_tokens" in errs[0] and "cluster.gpu_memory_gb = 80" in errs[0]
    # The same layout on H200s fits.
    assert _errors("nemotron_h_8b_igrpo.yaml", stand_ins, "trainer.micro_batch_tokens=32768",
                   "cluster.gpu_memory_gb=141") == []


def test_fp8_rules(stand_ins):
    errs = _errors("nemotron_h_8b_igrpo.yaml", stand_ins, "model.transformer_impl=local")
    assert any(e.startswith("model.fp8 = 'tensorwise'") and "model.transformer_impl" in e for e in errs), errs
    errs = _errors("r1_distill_qwen_7b_igrpo.yaml", stand_ins, "model.fp8=tensorwise", "model.ffn_hidden_size=18952")
    assert any("model.ffn_hidden_size / TP = 9476" in e for e in errs), errs


def test_cli_prints_the_plan_and_exits_2_on_errors(stand_ins, capsys):
    assert main(["plan", str(RECIPES / "nemotron_h_8b_igrpo.yaml"), *stand_ins]) == 0
    out = capsys.readouterr().out
    assert "parameters: 8.101 B" in out and "TP 2 x PP 1 x CP 1 x DP 8" in out and out.endswith("plan: OK\n")
    assert main(["plan", str(RECIPES / "nemotron_h_8b_igrpo.yaml"), *stand_ins, "trainer.eval_every=5",
                 "evaluation.hook.benchmarks=[heldout]"]) == 2
    assert "error: trainer.eval_every = 5" in capsys.readouterr().out


def test_the_loop_refuses_before_building_anything(stand_ins, tmp_path, monkeypatch):
    """The GPU recipes' old crash: the in-training 'heldout' evaluation with no data.eval_path."""
    import torch.distributed as dist

    from igrpo_megatron.evaluation.hook import PeriodicEvaluator
    from igrpo_megatron.training.loop import run_training

    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it for the recipe's one trainer node
    recipe = load_recipe(RECIPES / "r1_distill_qwen_7b_igrpo.yaml",
                         [*stand_ins, f"run.output_dir={tmp_path / 'runs'}", "evaluation.hook.benchmarks=[heldout]"])
    with pytest.raises(PlanError, match=r"data\.eval_path, which is null"):
        run_training(recipe, evaluator=PeriodicEvaluator)  # as igrpo train calls it
    assert not dist.is_initialized()                  # no process group, so no model, no sidecar
    assert not (tmp_path / "runs").exists()           # nothing written either
    # The recipe as shipped, without its evaluation files: the error names evaluation.data_dir.
    recipe = load_recipe(RECIPES / "r1_distill_qwen_7b_igrpo.yaml",
                         [stand_ins[0], stand_ins[1], f"run.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(PlanError, match=r"evaluation\.data_dir"):
        run_training(recipe, evaluator=PeriodicEvaluator)  # as igrpo train calls it
    assert not dist.is_initialized()


def test_memory_estimate_for_the_planned_nemotron_layout(stand_ins):
    plan = check_plan(load_recipe(RECIPES / "nemotron_h_8b_igrpo.yaml", stand_ins))
    assert (plan.world_size, plan.data_parallel) == (16, 8)
    per_rank = plan.params_per_rank[0]
    st = plan.state_per_rank[0]
    assert (st.weights, st.gradients, st.optimizer) == (2 * per_rank, 4 * per_rank, 12 * per_rank // 8)
    # Full recomputation keeps far less than none; the recipe (no recompute key) is planned with none.
    assert plan.recompute == "none"
    assert plan.activations["full"].peak < plan.activations["none"].peak / 3
    assert plan.samples_per_step == 128 * 8 and plan.trained_sequences_per_step == 128 * 4
    assert plan.peak_gib() < 80 - 4 and st.total / GIB > 25


def test_a_layout_that_cannot_work_exits_2_naming_the_key(capsys):
    # Refused when the recipe loads (config/layout.py): 2 layers cannot split over 3 pipeline stages.
    assert main(["plan", str(RECIPES / "tiny_cpu.yaml"), "parallel.pipeline_model_parallel_size=3"]) == 2
    assert "parallel.pipeline_model_parallel_size (3)" in capsys.readouterr().err
    # Refused by the plan: the world size (cluster.nodes x gpus_per_node) does not fit TP x PP x CP.
    recipe = load_recipe(RECIPES / "tiny_cpu.yaml", ["parallel.tensor_model_parallel_size=2"])
    plan = make_plan(recipe)
    assert any("world size 1" in e for e in plan.errors), plan.errors
    assert plan.params_per_rank == [0] and plan.trainer_budget_gib is None  # not sized


def test_submit_runs_the_plan_before_sbatch(stand_ins):
    import subprocess
    import sys

    submit = [sys.executable, str(RECIPES.parent / "launchers" / "submit.py"), "--dry-run"]
    ok = subprocess.run([*submit, str(RECIPES / "r1_distill_qwen_7b_igrpo.yaml"), *stand_ins],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "sbatch" in ok.stdout.split()  # the command it would submit
    bad = subprocess.run([*submit, str(RECIPES / "r1_distill_qwen_7b_igrpo.yaml"), *stand_ins[:2]],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "sbatch" not in bad.stdout
    assert "evaluation.data_dir" in bad.stderr


def test_the_judge_recipe_says_the_judge_must_be_up(stand_ins):
    plan = check_plan(load_recipe(RECIPES / "r1_distill_qwen_7b_igrpo_judge.yaml",
                                  [*stand_ins, "reward.judge.url=http://judge:8001"]))
    assert any("http://judge:8001" in w and "launchers do not start it" in w for w in plan.warnings)


def test_matched_budget_check(stand_ins):
    plan = check_plan(load_recipe(RECIPES / "r1_distill_qwen_7b_grpo.yaml", stand_ins))
    assert plan.budget_matched and plan.budget.endswith("= 8: matched")
    assert plan.samples_per_step == 128 * 8 == plan.trained_sequences_per_step
    plan = check_plan(load_recipe(RECIPES / "r1_distill_qwen_7b_grpo.yaml", [*stand_ins, "algorithm.group_size=16"]))
    assert not plan.budget_matched and any("not at a matched budget" in w for w in plan.warnings)
