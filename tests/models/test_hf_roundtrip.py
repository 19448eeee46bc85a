"""Hugging Face Qwen2 <-> Megatron GPTModel: import, export, and the same logits as transformers
(at TP = PP = 1, TP = 2 and PP = 2)."""

import pytest
import torch

from igrpo_megatron.config.model import ModelConfig
from tests.helpers.distributed import run_on_ranks
from tests.helpers.hf_roundtrip import import_forward_export
from tests.helpers.tiny_models import build_tiny_qwen2, load_state_dict

pytestmark = pytest.mark.timeout(600)

SIZES = dict(hidden=128, heads=2, kv_heads=1, layers=2, intermediate=256, vocab_size=512, init_std=0.2)


def model_cfg() -> ModelConfig:
    return ModelConfig(architecture="qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=256,
                       num_attention_heads=2, num_query_groups=1, vocab_size=512, max_position_embeddings=1024,
                       norm_epsilon=1e-6, rotary_base=10000.0, transformer_impl="local")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("hf") / "tiny", seed=3, **SIZES)


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens()).logits


def _import_export(rank, world_size, hf_path, out_path, parallel_kwargs):
    return import_forward_export(rank, world_size, model_cfg(), tokens(), hf_path, out_path, parallel_kwargs)


def test_megatron_matches_transformers_and_export_is_exact(hf_dir, tmp_path):
    out = tmp_path / "exported"
    (megatron_logits,) = run_on_ranks(_import_export, 1, args=(str(hf_dir), str(out), {}))
    reference = hf_logits(hf_dir)
    # Same weights, same maths: Megatron's logits equal transformers' up to fp32 rounding.
    torch.testing.assert_close(megatron_logits, reference, rtol=1e-4, atol=1e-4)
    assert reference.std() > 0.1  # init_std=0.2 makes the comparison non-trivial
    # Export: every tensor comes back bit for bit, and transformers reloads it to identical logits.
    original, exported = load_state_dict(hf_dir), load_state_dict(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        assert torch.equal(original[name], exported[name]), name
    assert torch.equal(hf_logits(out), reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_sharded_import_export_round_trip(hf_dir, tmp_path, layout):
    out = tmp_path / "exported"
    logits = run_on_ranks(_import_export, 2, args=(str(hf_dir), str(out), layout))
    # TP=2: both ranks hold the gathered logits; PP=2: only the last stage (rank 1) has any.
    expected_ranks = [0, 1] if layout.get("tensor_model_parallel_size", 1) == 2 else [1]
    assert [r for r, x in enumerate(logits) if x is not None] == expected_ranks
    reference = hf_logits(hf_dir)
    for rank in expected_ranks:  # the sharded model computes what transformers computes
        torch.testing.assert_close(logits[rank], reference, rtol=1e-4, atol=1e-4)
    original, exported = load_state_dict(hf_dir), load_state_dict(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        assert torch.equal(original[name], exported[name]), name


def test_mismatched_recipe_is_refused(hf_dir):
    from igrpo_megatron.models.hf_io import HFCheckpointError, check_hf_config

    wrong = model_cfg()
    wrong.num_layers = 4
    with pytest.raises(HFCheckpointError, match=r"model\.num_layers: recipe has 4, .*config\.json has 2"):
        check_hf_config(hf_dir, wrong)
