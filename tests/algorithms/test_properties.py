"""Property tests: shapes, masks with empty sequences, and no NaN on extreme inputs."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from igrpo_megatron.algorithms import (
    LOSS_VARIANTS,
    build_refinement_prompt,
    group_advantages,
    policy_loss,
    select_drafts,
    vocab_parallel_logprobs_and_entropy,
    with_variant,
)
from igrpo_megatron.config.algorithm import (
    AlgorithmConfig,
    KLConfig,
    RefinementPromptConfig,
    TruncatedISConfig,
)

SETTINGS = settings(max_examples=40, deadline=None)
EXTREME = st.sampled_from([0.0, 1.0, -1.0, 50.0, -50.0, 1e4, -1e4, 1e30, -1e30])


@st.composite
def logits_case(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))  # e.g. [B] or [B, T]
    vocab = draw(st.integers(1, 9))
    n = math.prod(lead) * vocab
    seed = draw(st.integers(0, 2**16))
    extremes = draw(st.lists(EXTREME, min_size=n, max_size=n))
    base = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    use_extreme = draw(st.booleans())
    values = torch.tensor(extremes) if use_extreme else base * draw(st.sampled_from([0.1, 1.0, 30.0]))
    targets = torch.randint(0, vocab, tuple(lead), generator=torch.Generator().manual_seed(seed))
    return values.reshape(*lead, vocab), targets, draw(st.sampled_from([0.3, 1.0, 2.0])), \
        draw(st.sampled_from([None, 1, 2]))


@SETTINGS
@given(logits_case())
def test_logprobs_entropy_shapes_and_finiteness(case):
    logits, targets, temperature, chunk = case
    logits.requires_grad_(True)
    logp, ent = vocab_parallel_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk)
    assert logp.shape == targets.shape == ent.shape
    assert torch.isfinite(logp).all() and (logp <= 1e-6).all()
    vocab = logits.shape[-1]
    assert torch.isfinite(ent).all() and (ent >= -1e-5).all() and (ent <= math.log(vocab) + 1e-4).all()
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
    assert torch.isfinite(grad).all()


@st.composite
def loss_case(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    scale = draw(st.sampled_from([0.1, 5.0, 1e4, 1e30]))
    logp = -scale * torch.rand(b, t, generator=g)
    old = -scale * torch.rand(b, t, generator=g)
    rollout = -scale * torch.rand(b, t, generator=g)
    ref = -scale * torch.rand(b, t, generator=g)
    logp[~mask] = float("nan")  # garbage on padding must not matter
    adv = draw(st.sampled_from([1.0, 100.0])) * torch.randn(b, generator=g)
    return logp, old, rollout, ref, adv, mask, draw(st.sampled_from(sorted(LOSS_VARIANTS))), \
        draw(st.sampled_from(["k1", "k2", "k3"])), draw(st.booleans())


@SETTINGS
@given(loss_case())
def test_policy_loss_is_finite_for_every_variant(case):
    logp, old, rollout, ref, adv, mask, variant, estimator, tis = case
    cfg = with_variant(AlgorithmConfig(), variant, max_length=6).loss
    cfg.kl = KLConfig(coef=0.01, estimator=estimator)
    cfg.truncated_is = TruncatedISConfig(enabled=tis)
    logp.requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref, rollout_logprobs=rollout)
    assert loss.shape == () and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in m.as_dict().values())
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    if not mask.any():
        assert loss.item() == 0.0


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**16), st.booleans(), st.booleans())
def test_advantages_shape_and_zero_mean(groups, size, seed, by_std, loo):
    rewards = torch.randint(0, 3, (groups, size), generator=torch.Generator().manual_seed(seed)).float()
    if loo and size < 2:
        loo = False
    adv, m = group_advantages(rewards, normalize_by_std=by_std, leave_one_out=loo)
    assert adv.shape == rewards.shape and torch.isfinite(adv).all()
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(groups), atol=1e-5, rtol=0)
    uniform = rewards.amax(1) == rewards.amin(1)
    assert (adv[uniform] == 0).all() and m.num_uniform_groups == int(uniform.sum())


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**16),
       st.sampled_from(["best", "worst", "random", "best_incorrect"]),
       st.sampled_from(["first", "random"]), st.sampled_from(["keep", "skip", "no_draft"]))
def test_selection_is_in_range_and_follows_the_rule(p, n, seed, rule, tie_break, policy):
    rewards = torch.randint(0, 3, (p, n), generator=torch.Generator().manual_seed(seed)).float() / 2
    s = select_drafts(rewards, rule, policy, tie_break=tie_break, seed=seed)
    assert s.indices.shape == (p,) and ((s.indices >= 0) & (s.indices < n)).all()
    if rule == "best":
        assert torch.equal(s.selected_rewards, rewards.amax(1))
    if rule == "worst":
        assert torch.equal(s.selected_rewards, rewards.amin(1))
    assert (s.use_draft <= s.refine).all()  # a draft is only shown to a prompt that is refined


@SETTINGS
@given(st.lists(st.sampled_from(["a", "bb", "<think>", "</think>", "x y", "\n", "{", "}"]), max_size=40),
       st.integers(0, 30), st.sampled_from(["keep_tail", "keep_head"]))
def test_prompt_fits_whenever_an_empty_draft_fits(pieces, budget, side):
    count = lambda s: len(s.split())  # noqa: E731
    cfg = RefinementPromptConfig(template="{problem} | {draft}", truncation=side)
    r = build_refinement_prompt("solve it", "".join(pieces), cfg, max_prompt_tokens=budget, count_tokens=count)
    empty_fits = count("solve it | ") <= budget
    assert r.fits == empty_fits and r.prompt_tokens == count(r.text)
    if r.fits:
        assert r.prompt_tokens <= budget
