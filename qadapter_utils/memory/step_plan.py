"""Planning a packed training step: how many tokens per optimizer step, and how many decoder layers to checkpoint,
for a memory budget.

    cost = cost_from_estimate("llama2-7b", optimizer="paged_adamw_8bit")     # no GPU: the estimator's numbers
    plan = plan_tokens_per_step(cost, budget=11 * GiB, lengths=[180, 256, 1024, ...])
    plan.tokens_per_step, plan.checkpointed_layers    # make_trainer(tokens_per_step=..., checkpoint_layers=...)
    plan_tokens_per_step("llama2-7b", 11 * GiB, lengths)                     # the same, in one call

With padding-free packing (data.make_collator(packing=True)) a step holds T tokens of whole samples, and with
partial checkpointing (fast.checkpoint_layers) the first c of the L decoder layers recompute their forward in
backward while the others keep their activations. Both knobs trade memory for speed, so the planner models a step
as linear in T, with a memory and a time line:

    peak(T, c)    = fixed + T * (a + (L - c) * b)      a: bytes per token with every layer checkpointed
                                                        b: bytes per token that one un-checkpointed layer adds
    seconds(T, c) = t0 + T * (u + (c / L) * r)          u: seconds per token, r: recomputation per token (all L)

calibrated from three steps -- A: (T0, all L checkpointed), B: (T0, none), C: (2 T0, all) -- either measured on a
GPU (cost_from_probes; benchmarks/recipe_vs_peft.py runs them) or estimated from the model's shape
(cost_from_estimate; the time line is then in relative units: a fixed cost per step, the recomputed forward as a
third of a step). plan_tokens_per_step picks, among the candidate T that hold the longest sample and every c in
0..L, the pair with the highest predicted tokens/s whose predicted peak stays under `margin` x budget (ties: fewer
checkpointed layers, then more tokens); a budget nothing fits raises ValueError naming what the smallest plan
needs. More budget never lowers the predicted tokens/s (the choices only grow), but the choice may move between
more tokens and fewer checkpointed layers. verify_plan then runs the
fullest batch of the plan (a callable you pass) and steps down -- more checkpointed layers first, then 3/4 of the
tokens -- while the measured peak exceeds the budget.

A module of its own beside plan.py (what fits on a whole GPU, from the estimate only): this one plans two knobs of
the fast recipe (qadapter_utils.fast) and also takes measured steps, and the two together would be more than a
reader holds at once. Holds StepCost, StepPlan, cost_from_estimate, cost_from_probes, plan_tokens_per_step and
verify_plan. Imports its sibling qadapter_utils.memory.estimate. Used by make_trainer's callers and
benchmarks/recipe_vs_peft.py (issue #13).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .estimate import GiB, _resolve_config, estimate_training_memory

#: Tokens per step the planner considers by default: 1 and 1.5 times the powers of two from 128 to 65,536.
DEFAULT_CANDIDATES = tuple(sorted(int(m * 2**k) for k in range(7, 17) for m in (1, 1.5)))
#: Default share of the budget the predicted peak may use (the linear model is calibrated on short steps).
DEFAULT_MARGIN = 0.92
#: Extra time of a step with every layer checkpointed, as a share of the step without: one more forward pass,
#: about a third of forward + backward. Used only by cost_from_estimate (no measured times).
RECOMPUTE_SHARE = 1 / 3
#: The time of a step that does not grow with its tokens (the 4-bit weights dequantized in forward, recomputation
#: and backward, the optimizer step, kernel launches), in tokens' worth of compute: the probe steps of
#: benchmarks/recipe_vs_peft.py measured about 1,700 (H100) and 7,000 (H200) for the Llama-2-7B shape. Used only
#: by cost_from_estimate; it is what makes larger steps faster.
FIXED_STEP_TOKENS = 4096


@dataclass(frozen=True)
class StepCost:
    """The linear memory and time model of one packed training step (see the module docstring): peak(T, c) and
    tokens_per_second(T, c) for T tokens per step and c checkpointed layers of `layers`. `source` says where the
    numbers come from ("estimate" or "probes"), `probes` holds the three calibration steps
    {"A"|"B"|"C": (tokens, seconds, peak bytes)}."""
    layers: int
    fixed_bytes: float
    bytes_per_token: float
    bytes_per_token_layer: float
    seconds_fixed: float = 0.0
    seconds_per_token: float = 1.0
    recompute_seconds_per_token: float = 0.0
    source: str = ""
    probes: dict = field(default_factory=dict)

    def peak(self, tokens: int, checkpointed: int) -> float:
        """Predicted peak bytes of a step of `tokens` tokens with `checkpointed` layers checkpointed."""
        per_token = self.bytes_per_token + (self.layers - checkpointed) * self.bytes_per_token_layer
        return self.fixed_bytes + tokens * per_token

    def tokens_per_second(self, tokens: int, checkpointed: int) -> float:
        """Predicted tokens per second (relative units when calibrated from the estimate)."""
        per_token = self.seconds_per_token + checkpointed / self.layers * self.recompute_seconds_per_token
        return tokens / (self.seconds_fixed + tokens * per_token)


@dataclass(frozen=True)
class StepPlan:
    """What plan_tokens_per_step chose: tokens_per_step and checkpointed_layers (of `layers`), the predicted peak
    bytes and tokens/s, the budget and margin it planned for, the StepCost it used, and the measured attempts of
    verify_plan (empty until verified)."""
    tokens_per_step: int
    checkpointed_layers: int
    layers: int
    predicted_peak: float
    predicted_tokens_per_s: float
    budget: int
    margin: float
    cost: StepCost
    verification: tuple = ()

    def summary(self) -> dict:
        """The plan as plain numbers (GiB rounded to 0.01), for logs and JSON."""
        return {"tokens_per_step": self.tokens_per_step, "checkpointed_layers": self.checkpointed_layers,
                "layers": self.layers, "predicted_peak_gib": round(self.predicted_peak / GiB, 2),
                "predicted_tokens_per_s": float(f"{self.predicted_tokens_per_s:.4g}"),
                "budget_gib": round(self.budget / GiB, 2), "margin": self.margin, "cost_from": self.cost.source,
                "verification": list(self.verification)}


def _fit(layers: int, probes: dict, base_bytes: float, source: str) -> StepCost:
    """The StepCost through the three calibration steps A (T0, all), B (T0, none), C (2 T0, all); negative slopes
    (measurement noise) are clipped to zero."""
    (tA, sA, pA), (_, sB, pB), (tC, sC, pC) = probes["A"], probes["B"], probes["C"]
    a = max((pC - pA) / max(tC - tA, 1), 0.0)
    b = max((pB - pA) / (layers * tA), 0.0)
    r = max((sA - sB) / tA, 0.0)
    u = max(max((sC - sA) / max(tC - tA, 1), 1e-12) - r, 1e-12)
    return StepCost(layers=layers, fixed_bytes=base_bytes + max(pA - base_bytes - a * tA, 0.0),
                    bytes_per_token=a, bytes_per_token_layer=b, seconds_fixed=max(sA - tA * (u + r), 0.0),
                    seconds_per_token=u, recompute_seconds_per_token=r, source=source,
                    probes={k: tuple(v) for k, v in probes.items()})


def cost_from_probes(step: Callable[[int, int], tuple], layers: int, probe_tokens: int,
                     base_bytes: float = 0) -> StepCost:
    """Calibrate the StepCost from three measured steps: step(tokens, checkpointed_layers) runs one training
    step of (about) `tokens` tokens and returns (real tokens, seconds, peak bytes); it is called with
    (probe_tokens, layers), (probe_tokens, 0) and (2 * probe_tokens, layers). base_bytes: what is allocated
    before any step (weights, optimizer state), the part of the peak that does not grow with tokens."""
    _check_int("layers", layers, 1)
    _check_int("probe_tokens", probe_tokens, 1)
    probes = {"A": step(probe_tokens, layers), "B": step(probe_tokens, 0), "C": step(2 * probe_tokens, layers)}
    return _fit(layers, probes, base_bytes, "probes")


def cost_from_estimate(config="llama2-7b", *, probe_tokens: int = 2048, recompute_share: float = RECOMPUTE_SHARE,
                       fixed_step_tokens: float = FIXED_STEP_TOKENS, **estimate_kwargs) -> StepCost:
    """Calibrate the StepCost without a GPU: the three calibration steps are estimate_training_memory(config,
    batch_size=1, seq_len=T, gradient_checkpointing=...) (`estimate_kwargs` go there: bits, adapter, optimizer,
    device, ...), times in relative units: a step takes `fixed_step_tokens` plus 1 per token without
    checkpointing, recomputing every layer adds `recompute_share` per token. config: a transformers config, a
    model (its .config) or a shape name of qadapter_utils.models.SHAPES. The estimate is of make_trainer's recipe
    (estimate_training_memory's default: chunked loss, packed attention) unless estimate_kwargs say otherwise."""
    config = _resolve_config(getattr(config, "config", config))
    _check_int("probe_tokens", probe_tokens, 1)
    if not 0 <= recompute_share < 10:
        raise ValueError(f"recompute_share={recompute_share!r}: a share of a step's time, e.g. {RECOMPUTE_SHARE:.2f}")
    if not 0 <= fixed_step_tokens < 2**31:
        raise ValueError(f"fixed_step_tokens={fixed_step_tokens!r}: tokens' worth of time per step, e.g. "
                         f"{FIXED_STEP_TOKENS}")
    for key in ("batch_size", "seq_len", "gradient_checkpointing"):
        if key in estimate_kwargs:
            raise ValueError(f"{key} is the planner's to choose: leave it out of cost_from_estimate's arguments")
    layers = config.num_hidden_layers

    def step(tokens, checkpointed):
        peak = estimate_training_memory(config, batch_size=1, seq_len=tokens,
                                        gradient_checkpointing=checkpointed > 0, **estimate_kwargs).total
        return tokens, fixed_step_tokens + tokens * (1 + recompute_share * checkpointed / layers), peak

    return dataclasses.replace(cost_from_probes(step, layers, probe_tokens), source="estimate")


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: use an integer >= {low}")


def _check_inputs(budget, lengths, candidates, margin) -> list[int]:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget={budget!r}: the memory budget in bytes, e.g. 11 * GiB (GiB = 2**30)")
    lengths = list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError("lengths: the token counts of the training samples, a non-empty list of integers >= 1")
    if not 0 < margin <= 1:
        raise ValueError(f"margin={margin!r}: the share of the budget the predicted peak may use, in (0, 1]")
    if not candidates or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in candidates):
        raise ValueError(f"candidates={candidates!r}: tokens per step to consider, integers >= 1")
    return lengths


def plan_tokens_per_step(cost, budget: int, lengths: Sequence[int], *, candidates: Sequence[int] | None = None,
                         margin: float = DEFAULT_MARGIN, **estimate_kwargs) -> StepPlan:
    """Tokens per optimizer step and checkpointed decoder layers for packed training of samples of `lengths`
    tokens within `budget` bytes of GPU memory (peak allocated, as torch.cuda.max_memory_allocated counts it).

    cost: a StepCost (cost_from_probes, cost_from_estimate), or a model / transformers config / shape name,
    which calls cost_from_estimate(cost, **estimate_kwargs). candidates: the tokens per step to consider
    (default DEFAULT_CANDIDATES); those below the longest sample are skipped (a packed step holds whole samples).
    Chooses the highest predicted tokens/s with predicted peak <= margin * budget; ties go to fewer checkpointed
    layers, then more tokens. Raises ValueError when no candidate holds the longest sample, or when even the
    smallest step with every layer checkpointed is predicted above the budget (the message says how much it
    needs). (issue #13)"""
    candidates = list(DEFAULT_CANDIDATES if candidates is None else candidates)
    lengths = _check_inputs(budget, lengths, candidates, margin)
    if not isinstance(cost, StepCost):
        cost = cost_from_estimate(cost, **estimate_kwargs)
    elif estimate_kwargs:
        raise ValueError(f"{sorted(estimate_kwargs)}: estimator arguments go with a model or config, not a StepCost")
    longest, L = max(lengths), cost.layers
    usable = [int(t) for t in candidates if t >= longest]
    if not usable:
        raise ValueError(f"no candidate tokens per step holds the longest sample ({longest} tokens; largest "
                         f"candidate {max(candidates)}): pass larger candidates or cut the samples")
    options = [(cost.tokens_per_second(T, c), -c, T, c) for T in usable for c in range(L + 1)
               if cost.peak(T, c) <= margin * budget]
    if not options:
        smallest = min(usable)
        need = cost.peak(smallest, L)
        raise ValueError(f"budget {_size(budget)} is too small: the smallest plan ({smallest} tokens per step, all "
                         f"{L} layers checkpointed) is predicted to need {_size(need)}, more than {margin:.0%} of the "
                         f"budget ({_size(margin * budget)}); {_size(cost.fixed_bytes)} of it does not depend on the "
                         f"tokens (weights, optimizer state)")
    tps, _, T, c = max(options)
    return StepPlan(tokens_per_step=T, checkpointed_layers=c, layers=L, predicted_peak=cost.peak(T, c),
                    predicted_tokens_per_s=tps, budget=int(budget), margin=margin, cost=cost)


def verify_plan(plan: StepPlan, measure: Callable[[int, int], float | None], longest: int,
                attempts: int = 6) -> StepPlan:
    """Check `plan` by measurement and step down until it fits: measure(tokens_per_step, checkpointed_layers)
    runs the fullest batch of that plan and returns its peak bytes, or None when it ran out of memory. While the
    peak exceeds plan.budget: checkpoint more layers (half of those left, at least 2) until all are, then take
    3/4 of the tokens (never below `longest`, the longest sample). At most `attempts` measurements; returns the
    plan that was last measured, its attempts in .verification (each with "fits")."""
    _check_int("attempts", attempts, 1)
    T, c, L = plan.tokens_per_step, plan.checkpointed_layers, plan.layers
    tries = []
    while True:
        peak = measure(T, c)
        fits = peak is not None and peak <= plan.budget
        tries.append({"tokens_per_step": T, "checkpointed_layers": c, "oom": peak is None,
                      "measured_peak_gib": None if peak is None else round(peak / GiB, 2), "fits": fits})
        if fits or len(tries) == attempts or (c == L and T == longest):
            break
        if c < L:
            c = min(L, c + max(2, (L - c) // 2))
        else:
            T = max(longest, T * 3 // 4)
    return dataclasses.replace(plan, tokens_per_step=T, checkpointed_layers=c,
                               predicted_peak=plan.cost.peak(T, c),
                               predicted_tokens_per_s=plan.cost.tokens_per_second(T, c), verification=tuple(tries))
