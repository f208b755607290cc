"""Planning: what fits on a GPU, from the estimate (no GPU needed).

    fits("llama2-7b", "T4", adapter="lora", batch_size=1, seq_len=2048)
    max_batch_size("T4", "llama2-7b", seq_len=1024), max_seq_len("T4", "llama2-7b", batch_size=1)

`fits`, `max_batch_size` and `max_seq_len` add a safety margin (SAFETY_MARGIN of the estimate) and the CUDA
context (CUDA_CONTEXT_GIB) to the estimated peak and compare with a GPU's memory (GPUS, or a number of GiB).

Holds GPUS, CUDA_CONTEXT_GIB, SAFETY_MARGIN, FitReport, fits, max_batch_size and max_seq_len. Imports its sibling
qadapter_utils.memory.estimate (estimate_training_memory, MemoryEstimate). Introduced in
notebooks/07_memory_profiling.ipynb.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .estimate import GiB, MemoryEstimate, estimate_training_memory

#: Usable memory of common GPUs in GiB (what `torch.cuda.get_device_properties(0).total_memory` reports).
GPUS: dict[str, float] = {
    "T4": 14.75,          # Colab's free GPU: 15360 MiB on the card, ~14.7 GiB visible to PyTorch
    "V100-16GB": 15.77,
    "A10G": 22.2,
    "L4": 21.96,
    "RTX 3090": 23.7,
    "RTX 4090": 23.65,
    "A100-40GB": 39.39,
    "A100-80GB": 79.15,
    "H100-80GB": 79.18,
    "H200": 139.8,
}
#: Memory a CUDA process holds outside the PyTorch allocator (CUDA context, kernels), GiB: measured 0.60 on an
#: H100 and an H200 with torch 2.11 (benchmarks/results), 0.3-0.5 on older GPUs.
CUDA_CONTEXT_GIB = 0.6
#: Default safety margin of the planner, on the estimated peak allocated: PyTorch's caching allocator reserves more
#: than it hands out, and a request fails when no reserved block is large enough. Measured through make_trainer and
#: a Trainer on an H200 (benchmarks/results/memory_grid_h200.json, the 28 rows that record it): peak reserved
#: 3-24 % above peak allocated; on the T4 stand-in (14.15 GiB) a run failed with 11.9 GiB allocated and 2.5 GiB
#: reserved but unusable.
SAFETY_MARGIN = 0.25


def _gpu_bytes(gpu) -> tuple[str, int]:
    if isinstance(gpu, (int, float)):
        return f"{gpu:g} GiB GPU", int(gpu * GiB)
    if isinstance(gpu, str):
        for name, gib in GPUS.items():
            if gpu.strip().lower() in (name.lower(), name.lower().split("-")[0]):
                return name, int(gib * GiB)
    raise ValueError(f"gpu={gpu!r}: use one of {', '.join(GPUS)} or the GPU's memory in GiB (a number)")


@dataclass
class FitReport:
    """What `fits` returns: fits (bool), need and available bytes, the estimate and a sentence saying why, with
    what would make it fit when it does not. (07_memory_profiling)"""
    fits: bool
    need: int
    available: int
    gpu: str
    estimate: MemoryEstimate
    reason: str
    suggestions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.fits

    def __str__(self) -> str:
        return self.reason + "".join(f"\n  - {s}" for s in self.suggestions)


def _need(estimate: MemoryEstimate, safety_margin: float) -> int:
    """GPU memory a run needs: the estimated peak allocated, plus the safety margin on it, plus the CUDA context."""
    return int(estimate.total * (1 + safety_margin) + CUDA_CONTEXT_GIB * GiB)


def fits(config="llama2-7b", gpu="T4", *, safety_margin: float = SAFETY_MARGIN, suggest: bool = True,
         **estimate_kwargs) -> FitReport:
    """Whether training fits on `gpu` (a name of GPUS such as "T4", "A100-40GB", or memory in GiB): the estimated
    peak (estimate_training_memory(config, **estimate_kwargs)) plus `safety_margin` of it (allocator reserve,
    fragmentation) plus the CUDA context (CUDA_CONTEXT_GIB) must not exceed the GPU's memory. Returns a
    FitReport (truthy when it fits) whose reason names the largest terms and, when it does not fit, changes that
    would (checkpointing, 4-bit, a smaller batch or sequence, a paged 8-bit optimizer). (07_memory_profiling)"""
    _check_margin(safety_margin)
    gpu_name, available = _gpu_bytes(gpu)
    estimate = estimate_training_memory(config, **estimate_kwargs)
    need = _need(estimate, safety_margin)
    ok = need <= available
    top = sorted(((v, k) for k, v in estimate.terms.items() if v), reverse=True)[:3]
    parts = ", ".join(f"{k} {v / GiB:.2f}" for v, k in top)
    verdict = "fits" if ok else "does NOT fit"
    reason = (f"{verdict} on {gpu_name} ({available / GiB:.1f} GiB): needs ~{need / GiB:.1f} GiB = estimated peak "
              f"{estimate.total / GiB:.2f} GiB (at {estimate.peak_at}) + {100 * safety_margin:.0f}% margin + "
              f"{CUDA_CONTEXT_GIB} GiB CUDA context; largest terms (GiB): {parts}; recipe: {estimate.recipe}")
    suggestions = []
    if not ok and suggest:
        kw = dict(estimate.inputs)
        kw.pop("config", None)
        options = []
        if not kw["gradient_checkpointing"]:
            options.append(("turn on gradient checkpointing", {"gradient_checkpointing": True}))
        if kw["bits"] != 4:
            options.append(("quantize to 4 bits (NF4)", {"bits": 4}))
        if kw["optimizer"] not in ("paged_adamw_8bit", "sgd") and estimate.terms["optimizer states"] > 0.5 * GiB:
            options.append(("use the paged 8-bit AdamW (optimizer='paged_adamw_8bit')",
                            {"optimizer": "paged_adamw_8bit"}))
        if kw["recipe"] == "plain":
            options.append(("train with qadapter_utils.train.make_trainer (recipe='make_trainer': chunked loss, "
                            "packed attention)", {"recipe": "make_trainer"}))
        elif kw["gradient_checkpointing"] and not kw["offload_checkpoints"]:
            options.append(("tile the MLP and offload the checkpoints (make_trainer(tiled_mlp=4096, "
                            "offload_checkpoints=True))", {"tiled_mlp": 4096, "offload_checkpoints": True}))
        if kw["batch_size"] > 1:
            options.append((f"use batch_size={kw['batch_size'] // 2} (and gradient accumulation)",
                            {"batch_size": kw["batch_size"] // 2}))
        if kw["seq_len"] > 256:
            options.append((f"use seq_len={kw['seq_len'] // 2}", {"seq_len": kw["seq_len"] // 2}))
        base = {k: v for k, v in estimate_kwargs.items()}
        for text, change in options:
            alt = estimate_training_memory(config, **{**base, **change})
            alt_need = _need(alt, safety_margin)
            mark = "fits" if alt_need <= available else "still too much"
            suggestions.append(f"{text}: needs ~{alt_need / GiB:.1f} GiB ({mark})")
    return FitReport(fits=ok, need=need, available=available, gpu=gpu_name, estimate=estimate, reason=reason,
                     suggestions=suggestions)


def _largest(predicate, low: int, high: int) -> int:
    """The largest n in [low, high] with predicate(n), assuming it is monotone (true then false); low - 1 if none."""
    if not predicate(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if predicate(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _check_margin(safety_margin) -> None:
    if isinstance(safety_margin, bool) or not isinstance(safety_margin, (int, float)) or \
            not 0 <= safety_margin < 1:
        raise ValueError(f"safety_margin={safety_margin!r}: use a fraction of the estimate in [0, 1), e.g. "
                         f"{SAFETY_MARGIN} (the allocator reserved 3-24% above the allocated peak in "
                         f"benchmarks/results/memory_grid_h200.json)")


def _check_limit(name: str, limit, smallest: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < smallest:
        raise ValueError(f"{name}={limit!r}: use an integer >= {smallest} (the largest value to consider)")


def max_batch_size(gpu="T4", config="llama2-7b", *, seq_len: int = 512, safety_margin: float = SAFETY_MARGIN,
                   limit: int = 4096, **estimate_kwargs) -> int:
    """The largest batch size (<= limit) whose training step fits on `gpu` at `seq_len`; 0 if not even 1 fits.
    limit < 1 and a safety_margin outside [0, 1) raise ValueError. (07_memory_profiling)"""
    _check_limit("limit", limit, 1)
    _check_margin(safety_margin)
    return _largest(lambda b: fits(config, gpu, safety_margin=safety_margin, suggest=False, batch_size=b,
                                   seq_len=seq_len, **estimate_kwargs).fits, 1, limit)


def max_seq_len(gpu="T4", config="llama2-7b", *, batch_size: int = 1, safety_margin: float = SAFETY_MARGIN,
                multiple_of: int = 256, limit: int = 131072, **estimate_kwargs) -> int:
    """The longest sequence (a multiple of `multiple_of`, <= limit) whose training step at `batch_size` fits on
    `gpu`; 0 if none does. Memory only: the model's trained context (4096 for Llama 2) is a separate limit.
    limit < multiple_of (no multiple fits under it) and a safety_margin outside [0, 1) raise ValueError.
    (07_memory_profiling)"""
    _check_limit("multiple_of", multiple_of, 1)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < multiple_of:
        raise ValueError(f"limit={limit!r} is below multiple_of={multiple_of}: no sequence length under the limit is "
                         f"a multiple of it; pass a smaller multiple_of (e.g. multiple_of=1) or a larger limit")
    _check_limit("limit", limit, multiple_of)
    _check_margin(safety_margin)
    n = _largest(lambda k: fits(config, gpu, safety_margin=safety_margin, suggest=False, batch_size=batch_size,
                                seq_len=k * multiple_of, **estimate_kwargs).fits, 1, limit // multiple_of)
    return max(0, n) * multiple_of
