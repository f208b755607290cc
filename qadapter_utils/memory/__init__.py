"""Where the memory of adapter training goes: measure it, estimate it without a GPU, plan what fits.

    report = profile_training_step(model, batch)                  # memory after each phase of one training step
    measured = measure_training_memory(model, batch_size=4, seq_len=512)["peak_allocated"]
    estimate = estimate_training_memory("llama2-7b", bits=4, adapter="lora", batch_size=4, seq_len=512)
    estimate.total, estimate.table(), estimate.recipe            # bytes, the breakdown, the recipe it assumed
    fits("llama2-7b", "T4", adapter="lora", batch_size=1, seq_len=2048)
    max_batch_size("T4", "llama2-7b", seq_len=1024), max_seq_len("T4", "llama2-7b", batch_size=1)
    plan_tokens_per_step("llama2-7b", 11 * GiB, lengths)       # packed training: tokens per step, checkpointed layers

Four modules, one per question, each with its own docstring; this package names their public functions, so
`from qadapter_utils import memory; memory.fits(...)` reaches all of them:

- measure.py: the memory of real training steps, phase by phase (CUDA allocator statistics on a GPU, the torch
  profiler's allocation events on the CPU). Imports no sibling.
- estimate.py: the peak of a training step predicted term by term from the model's shape (no weights, no GPU), for
  make_trainer's recipe or a plain Trainer's (RECIPES); checked against GPU measurements in tests/test_memory.py.
  Imports no sibling.
- plan.py: what fits on a GPU (estimate + safety margin + CUDA context vs the GPU's memory). Imports estimate.
- step_plan.py: tokens per step and checkpointed layers of packed training for a memory budget (a linear model
  calibrated from the estimate or from measured steps; issue #13). Imports estimate.

Introduced in notebooks/07_memory_profiling.ipynb. The folder is the unit to copy: its files import each other
relatively. Needs quant (weight bytes); shape names ("llama2-7b") need models, and adapter names ("lora") need
methods (the presets): without them, pass a transformers config and an adapters config object; a name then raises
a ValueError instead of silently meaning adapters' config of the same name.
"""
from __future__ import annotations

from .estimate import (
                                            CUBLAS_WORKSPACE,
                                            RECIPES,
                                            GiB,
                                            MemoryEstimate,
                                            MiB,
                                            count_adapter_params,
                                            estimate_for_row,
                                            estimate_training_memory,
                                            layer_activations,
)
from .measure import (
                                            MemoryProfile,
                                            make_optimizer,
                                            measure_training_memory,
                                            profile_training_step,
                                            random_batch,
                                            tensor_bytes,
)
from .plan import CUDA_CONTEXT_GIB, GPUS, SAFETY_MARGIN, FitReport, fits, max_batch_size, max_seq_len
from .step_plan import StepCost, StepPlan, cost_from_estimate, cost_from_probes, plan_tokens_per_step, verify_plan

__all__ = [
    "CUBLAS_WORKSPACE", "CUDA_CONTEXT_GIB", "GPUS", "GiB", "MiB", "RECIPES", "SAFETY_MARGIN",
    "FitReport", "MemoryEstimate", "MemoryProfile", "StepCost", "StepPlan",
    "cost_from_estimate", "cost_from_probes", "count_adapter_params", "estimate_for_row",
    "estimate_training_memory", "fits", "layer_activations", "make_optimizer", "max_batch_size", "max_seq_len",
    "measure_training_memory", "plan_tokens_per_step", "profile_training_step", "random_batch", "tensor_bytes",
    "verify_plan",
]
