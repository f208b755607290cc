"""qadapter_utils.memory.step_plan: the tokens-per-step / checkpointed-layers planner of packed training.

On the tiny model's config (and the Llama-2-7B shape, config only): the plan fits the budget by the estimator,
more budget never gives a slower plan, verification steps down as documented, bad input raises ValueError.
"""
from __future__ import annotations

import pytest

from qadapter_utils.memory import (
    GiB,
    MiB,
    StepCost,
    cost_from_estimate,
    cost_from_probes,
    estimate_training_memory,
    plan_tokens_per_step,
    verify_plan,
)
from qadapter_utils.models import load_model

LENGTHS = [40, 17, 96, 55, 23, 71, 8, 64]


@pytest.fixture(scope="module")
def tiny_config():
    model, _ = load_model("tiny", bits=4)
    return model.config


@pytest.fixture(scope="module")
def tiny_cost(tiny_config):
    return cost_from_estimate(tiny_config, probe_tokens=128, device="cpu", optimizer="adamw_torch")


def _budgets(cost, lengths):
    """Budgets from just above the smallest plan's need to far above the largest."""
    low = cost.peak(128, cost.layers) / 0.92 + 1
    return [int(low * 1.02 ** i) + 1 for i in range(0, 200, 7)]


def test_plan_fits_the_budget_by_the_estimator(tiny_config, tiny_cost):
    for budget in _budgets(tiny_cost, LENGTHS):
        plan = plan_tokens_per_step(tiny_cost, budget, LENGTHS)
        assert plan.tokens_per_step >= max(LENGTHS)
        assert 0 <= plan.checkpointed_layers <= plan.layers == tiny_config.num_hidden_layers
        assert plan.predicted_peak <= plan.margin * budget
        # the estimator itself at the chosen step, where it can say (all layers checkpointed or none; the linear
        # model interpolates the layers in between)
        if plan.checkpointed_layers in (0, plan.layers):
            estimate = estimate_training_memory(tiny_config, batch_size=1, seq_len=plan.tokens_per_step,
                                                device="cpu", gradient_checkpointing=plan.checkpointed_layers > 0)
            assert estimate.total <= budget


def test_the_linear_model_goes_through_the_estimator(tiny_config, tiny_cost):
    for tokens in (128, 256, 1024):
        for ckpt, layers in ((True, tiny_cost.layers), (False, 0)):
            est = estimate_training_memory(tiny_config, batch_size=1, seq_len=tokens, device="cpu",
                                           gradient_checkpointing=ckpt).total
            assert tiny_cost.peak(tokens, layers) == pytest.approx(est, rel=0.05)


def test_more_budget_never_gives_a_slower_plan(tiny_cost):
    plans = [plan_tokens_per_step(tiny_cost, b, LENGTHS) for b in _budgets(tiny_cost, LENGTHS)]
    speeds = [p.predicted_tokens_per_s for p in plans]
    assert speeds == sorted(speeds)
    assert plans[-1].tokens_per_step > plans[0].tokens_per_step  # the budget range does change the plan
    assert plans[0].checkpointed_layers == plans[0].layers  # the smallest budget: everything checkpointed


def test_7b_shape_from_the_shape_name():
    plan = plan_tokens_per_step("llama2-7b", 11 * GiB, [256, 1024, 512], optimizer="paged_adamw_8bit")
    assert plan.cost.source == "estimate" and plan.layers == 32
    assert plan.predicted_peak <= 0.92 * 11 * GiB and plan.tokens_per_step >= 4096
    assert plan.summary()["budget_gib"] == 11.0


def test_impossible_budget_raises_with_the_need(tiny_cost):
    need = tiny_cost.peak(128, tiny_cost.layers)
    with pytest.raises(ValueError, match=r"too small.*predicted to need \d+\.\d MiB"):
        plan_tokens_per_step(tiny_cost, int(need), LENGTHS)
    with pytest.raises(ValueError, match="holds the longest sample"):
        plan_tokens_per_step(tiny_cost, 10 * GiB, [5000], candidates=[1024, 2048])


@pytest.mark.parametrize("kwargs", [
    dict(budget=0), dict(budget=-1), dict(budget="8GB"), dict(budget=True), dict(lengths=[]), dict(lengths=[0, 3]),
    dict(lengths=[2.5]), dict(margin=0), dict(margin=1.5), dict(candidates=[]), dict(candidates=[512.0]),
])
def test_bad_input_raises(tiny_cost, kwargs):
    args = dict(cost=tiny_cost, budget=10 * GiB, lengths=LENGTHS)
    args.update(kwargs)
    with pytest.raises(ValueError):
        plan_tokens_per_step(**args)


def test_bad_estimate_arguments_raise(tiny_config, tiny_cost):
    with pytest.raises(ValueError, match="planner's to choose"):
        cost_from_estimate(tiny_config, seq_len=512)
    with pytest.raises(ValueError, match="not a StepCost"):
        plan_tokens_per_step(tiny_cost, 10 * GiB, LENGTHS, bits=8)
    with pytest.raises(ValueError):
        cost_from_estimate(tiny_config, probe_tokens=0)


def test_cost_from_probes_recovers_a_linear_step():
    truth = StepCost(layers=4, fixed_bytes=100 * MiB, bytes_per_token=1000, bytes_per_token_layer=250,
                     seconds_fixed=0.2, seconds_per_token=1e-4, recompute_seconds_per_token=3e-5)

    def step(tokens, checkpointed):
        return tokens, tokens / truth.tokens_per_second(tokens, checkpointed), truth.peak(tokens, checkpointed)

    cost = cost_from_probes(step, layers=4, probe_tokens=512, base_bytes=60 * MiB)
    for field in ("fixed_bytes", "bytes_per_token", "bytes_per_token_layer", "seconds_fixed", "seconds_per_token",
                  "recompute_seconds_per_token"):
        assert getattr(cost, field) == pytest.approx(getattr(truth, field), rel=1e-6), field
    assert cost.source == "probes" and set(cost.probes) == {"A", "B", "C"}


def test_verify_plan_steps_down_checkpointing_first_then_tokens(tiny_cost):
    plan = plan_tokens_per_step(tiny_cost, 10 * GiB, LENGTHS)  # lots of room: few layers checkpointed
    L = plan.layers
    seen = []

    def measure(tokens, checkpointed):  # pretends only all-checkpointed steps of <= 512 tokens fit
        seen.append((tokens, checkpointed))
        return None if tokens > 512 * 4 else plan.budget + (0 if checkpointed == L and tokens <= 512 else 1)

    checked = verify_plan(plan, measure, longest=max(LENGTHS), attempts=60)
    assert [c for _, c in seen] == sorted(c for _, c in seen)  # checkpointing only grows
    first_all = next(i for i, (_, c) in enumerate(seen) if c == L)
    assert all(t == plan.tokens_per_step for t, _ in seen[:first_all + 1])  # tokens shrink only after that
    assert checked.verification[-1]["fits"] and checked.tokens_per_step <= 512
    assert (checked.tokens_per_step, checked.checkpointed_layers) == seen[-1]
    fits_at_once = verify_plan(plan, lambda t, c: 0, longest=max(LENGTHS))
    assert len(fits_at_once.verification) == 1 and fits_at_once.tokens_per_step == plan.tokens_per_step
    gives_up = verify_plan(plan, lambda t, c: None, longest=max(LENGTHS), attempts=3)
    assert len(gives_up.verification) == 3 and not gives_up.verification[-1]["fits"]
