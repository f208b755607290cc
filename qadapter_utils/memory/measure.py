"""Measuring: the memory of real training steps, phase by phase (forward, backward, optimizer step).

    report = profile_training_step(model, batch)                  # memory after each phase of one training step
    measured = measure_training_memory(model, batch_size=4, seq_len=512)["peak_allocated"]

On a CUDA GPU the numbers are `torch.cuda` allocator statistics: allocated bytes and the peak of allocated bytes
(`max_memory_allocated`), which leave out the CUDA context (~0.3-0.6 GiB), the allocator's cached-but-free blocks
and bitsandbytes' paged (unified-memory) optimizer states. On the CPU the measure is different and labelled so:
the bytes of tensors held by PyTorch's CPU allocator, read from the allocation events of the torch profiler
(`profile_memory=True`) plus the model's tensors present before profiling started: the same quantity as
`memory_allocated` on a GPU, not the process RSS.

Holds tensor_bytes, make_optimizer, MemoryProfile, profile_training_step, random_batch and
measure_training_memory. Imports no sibling: it needs torch only (and bitsandbytes for its 8-bit and paged
optimizers). Introduced in notebooks/07_memory_profiling.ipynb.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from dataclasses import dataclass, field

import torch

GiB = 2**30

_OPTIMIZERS = (  # what make_optimizer builds, by the names of transformers' TrainingArguments.optim
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def tensor_bytes(model) -> int:
    """Bytes of the tensors a model holds: parameters, buffers and the bitsandbytes quantization state beside
    them (absmax, nested absmax, code tables, int8 row scales), each storage counted once. (07_memory_profiling)"""
    seen: set[tuple] = set()
    total = 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr())
        if key in seen:
            return
        seen.add(key)
        total += storage.nbytes()

    for module in model.modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            add(t)
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, getattr(state, "offset", None)):
                add(t)
            state2 = getattr(state, "state2", None)
            if state2 is not None:
                add(state2.absmax)
                add(state2.code)
        lt_state = getattr(module, "state", None)
        for t in (getattr(weight, "CB", None), getattr(weight, "SCB", None), getattr(lt_state, "CB", None),
                  getattr(lt_state, "SCB", None)):
            add(t)
    return total


def make_optimizer(name: str, params, lr: float = 1e-4):
    """The optimizer called `name` (the names of transformers' TrainingArguments.optim): adamw_torch,
    adamw_torch_fused, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, sgd. (07_memory_profiling)"""
    params = list(params)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
        return cls(params, lr=lr)
    raise ValueError(f"optimizer={name!r} is not supported: use one of {', '.join(_OPTIMIZERS)}")


class _CudaTracker:
    """Per-phase allocated / peak-allocated / reserved bytes from torch.cuda statistics."""
    measure = "cuda: torch.cuda.memory_allocated / max_memory_allocated (tensor bytes; CUDA context not included)"

    def __init__(self, device):
        self.device = device
        self.rows: list[dict] = []

    def start(self):
        torch.cuda.synchronize(self.device)
        self.rows.append(dict(phase="loaded", step=0, allocated=torch.cuda.memory_allocated(self.device),
                              peak=torch.cuda.memory_allocated(self.device),
                              reserved=torch.cuda.memory_reserved(self.device)))

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.rows.append(dict(phase=name, step=step, allocated=torch.cuda.memory_allocated(self.device),
                              peak=torch.cuda.max_memory_allocated(self.device),
                              reserved=torch.cuda.max_memory_reserved(self.device)))

    def stop(self):
        pass


class _CpuTracker:
    """Per-phase tensor bytes on the CPU from the torch profiler's allocation events (one profiling session
    over all phases, so that every allocation freed during it was also seen being made)."""
    measure = ("cpu: tensor bytes held by PyTorch's CPU allocator (torch profiler allocation events + the "
               "model's tensors; not process RSS)")

    def __init__(self, model):
        self.base = tensor_bytes(model)
        self.rows: list[dict] = []
        self._marks: list[tuple[str, int]] = []
        self._prof = None

    def start(self):
        import os

        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no "USDT ... profiler_start/stop" lines on every run
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        from torch.profiler import record_function

        self._marks.append((name, step))
        with record_function(f"qadapter_phase_{len(self._marks) - 1}"):
            yield

    def stop(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._prof.__exit__(None, None, None)
        events = list(self._prof.profiler.kineto_results.events())
        windows = {}
        for e in events:
            name = e.name()
            if name.startswith("qadapter_phase_"):
                windows[int(name.rsplit("_", 1)[1])] = (e.start_ns(), e.end_ns())
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self.rows = [dict(phase="loaded", step=0, allocated=self.base, peak=self.base, reserved=None)]
        current, j = self.base, 0
        for k, (name, step) in enumerate(self._marks):
            start, end = windows.get(k, (None, None))
            if start is None:
                continue
            while j < len(memory) and memory[j][0] < start:  # allocations between phases
                current += memory[j][1]
                j += 1
            peak = current
            while j < len(memory) and memory[j][0] <= end:
                current += memory[j][1]
                peak = max(peak, current)
                j += 1
            self.rows.append(dict(phase=name, step=step, allocated=current, peak=peak, reserved=None))


@dataclass
class MemoryProfile:
    """Memory per phase of training steps, as measured by `profile_training_step` / `measure_training_memory`.

    rows: one dict per phase (phase, step, allocated = bytes held after it, peak = most bytes held during it,
    reserved = allocator's reserved bytes on CUDA); measure: what the numbers are (CUDA allocator or CPU
    profiler); adapter_bytes: bytes of the trainable parameters. (07_memory_profiling)"""
    rows: list[dict]
    measure: str
    device: str
    adapter_bytes: int = 0
    info: dict = field(default_factory=dict)

    @property
    def peak_allocated(self) -> int:
        """The largest number of bytes held at any moment, model included."""
        return max(r["peak"] for r in self.rows)

    def frame(self):
        """The rows as a pandas DataFrame, bytes shown in GiB."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        for col in ("allocated", "peak", "reserved"):
            if col in frame and frame[col].notna().any():
                frame[col + " GiB"] = frame[col] / GiB
        return frame.drop(columns=[c for c in ("allocated", "peak", "reserved") if c in frame])

    def breakdown(self) -> dict[str, int]:
        """The measured peak split into parts, from the last step's phases: model weights, adapter parameters,
        optimizer states, activations kept at the end of the forward pass, and what the backward pass adds on top
        (logit gradients, temporaries); or, when the optimizer step holds the peak, gradients and its temporaries.
        """
        rows = self.rows
        loaded = rows[0]["allocated"]
        last = max(r["step"] for r in rows)
        by = {r["phase"]: r for r in rows if r["step"] == last}
        before = [r for r in rows if r["step"] == last - 1 and r["phase"] == "optimizer step"]
        start = before[-1]["allocated"] if before else loaded
        out = {"model weights": loaded - self.adapter_bytes, "adapter parameters": self.adapter_bytes,
               "optimizer states": max(0, start - loaded)}
        fwd, bwd, opt = by["forward"], by["backward"], by["optimizer step"]
        if opt["peak"] > max(fwd["peak"], bwd["peak"]):
            out["gradients"] = bwd["allocated"] - start
            out["optimizer temporaries"] = opt["peak"] - bwd["allocated"]
        else:
            out["activations (end of forward)"] = fwd["allocated"] - start
            if bwd["peak"] >= fwd["peak"]:
                out["backward extra (logit grads, temporaries)"] = bwd["peak"] - fwd["allocated"]
            else:
                out["forward extra (logits, temporaries)"] = fwd["peak"] - fwd["allocated"]
        return out


def _trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add and activate an adapter first, e.g. "
                         "qadapter_utils.methods.add_adapter(model, 'lora')")
    return params


def profile_training_step(model, batch: dict, optimizer=None, *, steps: int = 1) -> MemoryProfile:
    """Run `steps` training steps (forward with labels, backward, optimizer step, zero_grad) on `batch` and
    return the memory after each phase and its peak during it: a MemoryProfile. On CUDA the numbers come from
    torch.cuda statistics; on the CPU from the torch profiler's allocation events (tensor bytes, not RSS).
    optimizer: an optimizer over the model's trainable parameters, a name for `make_optimizer`, or None for
    AdamW. The model is put in train mode (transformers skips gradient checkpointing in eval mode).
    Drops the outputs before backward (as `AdapterTrainer` does), so the logits do not outlive the loss.
    (07_memory_profiling)"""
    if "labels" not in batch:
        raise ValueError("batch needs 'labels' (for a causal LM: labels = input_ids) so that the model returns a loss")
    if steps < 1:
        raise ValueError(f"steps={steps}: run at least one step")
    params = _trainable(model)
    model.train()
    device = _device_of(model)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    owns_optimizer = not isinstance(optimizer, torch.optim.Optimizer)
    tracker = _CudaTracker(device) if device.type == "cuda" else _CpuTracker(model)
    adapter_bytes = sum(p.numel() * p.element_size() for p in params)
    tracker.start()
    try:
        if owns_optimizer:
            optimizer = make_optimizer(optimizer or "adamw_torch", params)
        for step in range(1, steps + 1):
            with tracker.phase("forward", step):
                loss = model(**batch).loss
            with tracker.phase("backward", step):
                loss.backward()
                del loss
            with tracker.phase("optimizer step", step):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        tracker.stop()
        if owns_optimizer:
            del optimizer
        for p in params:
            p.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return MemoryProfile(rows=tracker.rows, measure=tracker.measure, device=str(device), adapter_bytes=adapter_bytes)


def random_batch(model, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """A batch of random token ids (no padding) with labels = input_ids, on the model's device."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator).to(_device_of(model))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def measure_training_memory(model, batch_size: int, seq_len: int, steps: int = 3, *, optimizer="adamw_torch",
                            seed: int = 0) -> dict:
    """Peak memory of `steps` full training steps (forward, backward, optimizer step) on a random batch of
    `batch_size` x `seq_len` tokens, with the model (and its adapter) already loaded.

    Returns a dict: "peak_allocated" (bytes: on CUDA `torch.cuda.max_memory_allocated()` over the steps, model
    included; on the CPU the profiler-based tensor bytes, see `measure`), "peak_reserved" (CUDA), "loaded"
    (bytes held before the first step), "measure", "device", "phases" (MemoryProfile rows) and "breakdown".
    Gradient checkpointing is whatever the model has (`model.gradient_checkpointing_enable()`); the model is put
    in train mode, without which transformers would skip it. (07_memory_profiling)"""
    profile = profile_training_step(model, random_batch(model, batch_size, seq_len, seed), optimizer, steps=steps)
    reserved = [r["reserved"] for r in profile.rows if r["reserved"] is not None]
    return {"peak_allocated": profile.peak_allocated, "peak_reserved": max(reserved) if reserved else None,
            "loaded": profile.rows[0]["allocated"], "measure": profile.measure, "device": profile.device,
            "phases": profile.rows, "breakdown": profile.breakdown(), "adapter_bytes": profile.adapter_bytes}
