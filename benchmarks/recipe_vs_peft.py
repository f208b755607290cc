"""Speed benchmark: the stock PEFT QLoRA recipe against the recipe the notebooks teach through qadapter_utils, on a
Llama-2-7B-shaped model (random weights, 4-bit NF4 + double quantization, bf16 compute), same GPU, same run.

    python benchmarks/recipe_vs_peft.py --out benchmarks/results        # a CUDA GPU (~4 min on an H100)
    python benchmarks/recipe_vs_peft.py --model tiny --quick --out /tmp/r   # a smoke test of every code path (CPU)

Both train LoRA r=16 (alpha 32, no dropout) on q_proj and v_proj with paged AdamW 8-bit, gradient clipping at 1.0
and bf16 autocast (what `Trainer(bf16=True)` does), for one epoch over the same length mix (benchmarks/lengths.py:
192 sequences, log-normal, median 256, 16-1,024 tokens), loss on every token:

- (a) the stock PEFT recipe: `prepare_model_for_kbit_training` (freezes the base, upcasts embeddings, norms and
  lm_head to fp32, reentrant gradient checkpointing), `LoraConfig` + `get_peft_model`, batches of 8 padded to the
  longest sample **with length grouping** (transformers' LengthGroupedSampler, what `group_by_length=True` uses),
  loss from `model(..., labels=...)`; its measured peak is the memory budget of the others.
- (b) the best stock recipe: the same PEFT model with padding-free batches of transformers'
  `DataCollatorWithFlattening` (8 samples per row, position ids restarting per sample) and SDPA (transformers
  builds the block-diagonal mask); also at ours' tokens per step (equal step size).
- ours: `qadapter_utils.models.load_model` + `methods.add_adapter(model, "lora")`, trained by
  `qadapter_utils.train.make_trainer` itself: its CUDA defaults (packed_attention: varlen kernel, checked below
  against per-sample attention; chunked_loss; training without the adapter's fp32 edge casts, a round trip under
  autocast), tokens_per_step and checkpoint_layers chosen for the budget by
  `qadapter_utils.memory.plan_tokens_per_step` (three probe steps calibrate its linear memory and time model,
  `verify_plan` checks the choice on the fullest batch), --tiled-mlp / --offload when asked; timed by make_trainer's
  StepStats callback over one epoch after 2 warm-up steps. Also at (b)'s mean tokens per step (equal step size) and
  without a memory limit. (a) and (b) run the benchmark's own loop (the same optimizer, clipping, autocast), as do
  the planner's probe steps of ours (without the edge casts, as make_trainer trains).

Reported per recipe: real tokens/s (padding excluded, whole epoch after 2 warm-up steps), tokens per step, peak
`max_memory_allocated`, MFU =
4 * N * tokens/s / (the GPU's bf16 matmul rate measured in the same run), N = 6.74e9. Also: ours without a memory
limit (for MFU), an ablation of ours' parts, LoRA vs prefix tuning vs a bottleneck adapter on the 4-bit base, a
profiler summary of one step of each recipe, and correctness checks on the GPU (packed samples do not attend to
each other: per-sample logits equal; ours' loss and gradients equal the plain recipe's on a small batch).

Writes <out>/recipe_vs_peft_<gpu>.json and .md (the tables). Needs torch, transformers, bitsandbytes, adapters,
peft (not `datasets`). t4_check.py imports the helpers of this file.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import lengths as mix  # noqa: E402

from qadapter_utils import methods, models, weights  # noqa: E402
from qadapter_utils.data import make_collator  # noqa: E402
from qadapter_utils.data import token_batches as pack_order  # noqa: E402
from qadapter_utils.fast import (  # noqa: E402
    PACKED_ATTENTION,
    PACKED_ATTENTION_SDPA,
    check_varlen_kernel,
    checkpoint_layers,
    offload_checkpoints,
    set_attention,
    tile_mlp,
)
from qadapter_utils.loss import causal_lm_loss  # noqa: E402
from qadapter_utils.memory import cost_from_probes, make_optimizer, plan_tokens_per_step, verify_plan  # noqa: E402

GIB = 2**30
N_7B = 6.74e9
LOG: list[str] = []


def log(*parts):
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# device helpers


def on_cuda() -> bool:
    return torch.cuda.is_available()


def sync():
    if on_cuda():
        torch.cuda.synchronize()


def reset_peak():
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if on_cuda() else 0


def allocated_bytes() -> int:
    return torch.cuda.memory_allocated() if on_cuda() else 0


def release():
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def gib(x):
    return None if x is None else round(x / GIB, 2)


def autocast(dtype):
    if on_cuda() and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "adapters", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            info[name] = f"missing ({type(err).__name__})"
    if on_cuda():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / GIB, 1),
                    cuda=torch.version.cuda, sms=props.multi_processor_count)
    else:
        info.update(gpu="none (CPU smoke test)")
    return info


def gpu_tag() -> str:
    if not on_cuda():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for tag in ("h200", "h100", "a100", "l4", "t4", "a10g", "4090", "3090"):
        if tag in name:
            return tag
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:20]


def matmul_rate(n: int = 8192, reps: int = 20) -> dict:
    """The dense bf16 matmul rate (TFLOP/s) on random data: median of `reps` timed n x n x n products after 3
    warm-ups, CUDA events. On the CPU a small fp32 product (smoke test only)."""
    if not on_cuda():
        n, reps = 256, 3
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return {"tflops": 2 * n**3 / sorted(times)[len(times) // 2] / 1e12, "n": n, "dtype": "float32"}
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    release()
    med = sorted(times)[len(times) // 2]
    return {"tflops": round(2 * n**3 / med / 1e12, 1), "n": n, "dtype": "bfloat16", "reps": reps,
            "statistic": "median"}


# ---------------------------------------------------------------------------------------------------------------
# models


def load_base(model_name: str, dtype):
    model, tok = models.load_model(model_name, bits=4, compute_dtype=dtype)
    return model, tok


def peft_recipe(model_name: str, dtype, gradient_checkpointing: bool = True, model=None):
    """The stock PEFT QLoRA recipe: prepare_model_for_kbit_training + LoraConfig(r=16, alpha=32, q/v)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model is None:
        model, tok = load_base(model_name, dtype)
    else:
        tok = None
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model, tok


def no_edge_casts(model):
    """The benchmark's own loop as make_trainer trains in mixed precision: without the fp32 casts at the adapters'
    edges (qadapter_utils.methods.cast_hooks_suspended; under autocast a round trip that changes nothing). On the
    CPU smoke test (fp32, no autocast) nothing to suspend."""
    return methods.cast_hooks_suspended(model) if on_cuda() else contextlib.nullcontext()


def ours_recipe(model_name: str, dtype, method: str = "lora", model=None, attention=PACKED_ATTENTION):
    if model is None:
        model, tok = load_base(model_name, dtype)
    else:
        tok = None
    if method.startswith("prefix"):
        attention = "eager"  # adapters 1.3.0 masks its prefix out under SDPA's boolean masks
    set_attention(model, attention)
    name = methods.add_adapter(model, method, gradient_checkpointing=True)
    model.train()
    return model, tok, {"adapter": name, "attention": attention}


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def paged_adamw_8bit(model, lr=2e-4):
    """Both recipes' optimizer (paged AdamW 8-bit) on the model's trainable parameters."""
    return make_optimizer("paged_adamw_8bit", trainable(model), lr=lr)


def n_params(model) -> int:
    """Parameters the model stands for (a packed 4-bit parameter holds two weights per byte)."""
    return sum(weights.logical_numel(p) for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# batches


def grouped_batches(lengths, batch_size: int, seed: int = 0, grouped: bool = True) -> list[list[int]]:
    """Index batches as the Trainer forms them: LengthGroupedSampler (group_by_length=True) or a random order."""
    g = torch.Generator().manual_seed(seed)
    if grouped:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = list(LengthGroupedSampler(batch_size, lengths=list(lengths), generator=g))
    else:
        order = torch.randperm(len(lengths), generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_batch(rows, idx, device, pad_id: int = 0) -> dict:
    """Right-padded batch as DataCollatorForSeq2Seq builds it: attention_mask, labels -100 on padding."""
    width = max(len(rows[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, i in enumerate(idx):
        r = torch.tensor(rows[i])
        ids[j, :len(r)], mask[j, :len(r)], labels[j, :len(r)] = r, 1, r
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def packed_batch(rows, idx, device, varlen: bool = True) -> dict:
    """One packed row through qadapter_utils.data.make_collator(packing=True) (transformers'
    DataCollatorWithFlattening: position ids restarting per sample, first label of each sample -100), plus the
    sample boundaries for the varlen attention (qadapter_utils.fast.packed_attention reads cu_seq_lens_q instead
    of deriving them from the position ids)."""
    batch = make_collator(None, packing=True)([{"input_ids": rows[i], "labels": rows[i]} for i in idx])
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}  # use_cache=False included
    if varlen:
        edges = [0]
        for i in idx:
            edges.append(edges[-1] + len(rows[i]))
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = torch.tensor(edges, dtype=torch.int32, device=device)
        out["max_length_q"] = out["max_length_k"] = max(len(rows[i]) for i in idx)
    return out


# ---------------------------------------------------------------------------------------------------------------
# training


def plain_loss(model, batch):
    return model(**batch).loss


def chunked_loss(chunk_size: int):
    def fn(model, batch):
        return causal_lm_loss(model, chunk_size=chunk_size, **batch)

    return fn


def optimizer_step(model, params, batch, loss_fn, optimizer, dtype, scaler=None) -> torch.Tensor:
    """Forward under autocast, backward (through the fp16 GradScaler when given), clip to norm 1, optimizer step;
    returns the detached loss."""
    with autocast(dtype):
        loss = loss_fn(model, batch)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_steps(model, batches, loss_fn, optimizer, dtype, warmup: int = 2, scaler=None, real_tokens=None) -> dict:
    """Run `warmup` untimed steps (the first batches again), then one timed step per batch. Returns real tokens,
    seconds, tokens/s, peak allocated (over warm-up and epoch), step times and first/last loss."""
    model.train()
    params = trainable(model)
    reset_peak()
    losses, times = [], []

    def step(batch):
        return optimizer_step(model, params, batch, loss_fn, optimizer, dtype, scaler)

    for batch in batches[:warmup]:
        step(batch)
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        losses.append(step(batch))
        sync()
        times.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    tokens = real_tokens if real_tokens is not None else sum(int((b["labels"] != -100).sum()) for b in batches)
    return {"real_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps": len(batches), "peak_gib": gib(peak_bytes()), "peak_bytes": peak_bytes(),
            "median_step_s": round(sorted(times)[len(times) // 2], 4), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4), "finite": all(math.isfinite(x) for x in losses)}


def one_step(model, batch, loss_fn, optimizer, dtype, scaler=None) -> tuple[float, int]:
    """One training step; returns (seconds, peak allocated during it)."""
    params = trainable(model)
    reset_peak()
    sync()
    t = time.perf_counter()
    optimizer_step(model, params, batch, loss_fn, optimizer, dtype, scaler)
    sync()
    return time.perf_counter() - t, peak_bytes()


def profile_step(model, batch, loss_fn, optimizer, dtype, rows: int = 18) -> dict:
    """torch.profiler over one training step: the top kernels by device time, and device time by category."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda() else [])
    one_step(model, batch, loss_fn, optimizer, dtype)  # warm
    with profile(activities=acts) as prof:
        one_step(model, batch, loss_fn, optimizer, dtype)
    events = prof.key_averages()
    key = "self_device_time_total" if on_cuda() else "self_cpu_time_total"

    def self_time(e):
        return getattr(e, key, None) or getattr(e, key.replace("device", "cuda"), 0) or 0

    if on_cuda():  # the kernels themselves (operators' device time would count them twice)
        events = [e for e in events if "cuda" in str(getattr(e, "device_type", "")).lower()] or list(events)
    total = sum(self_time(e) for e in events) or 1
    categories: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        cat = ("4-bit dequantize" if "dequant" in name else
               "attention" if any(s in name for s in ("flash", "fmha", "attention", "sdpa")) else
               "matmul (gemm)" if any(s in name for s in ("gemm", "cutlass", "sm90_xmma", "matmul", "cublas",
                                                          "nvjet", "addmm", "mm_")) else
               "copies / casts" if any(s in name for s in ("copy", "memcpy", "to_copy", "cast")) else
               "softmax / loss" if any(s in name for s in ("softmax", "logsumexp", "nll", "cross_entropy")) else
               "elementwise / norms / other")
        categories[cat] = categories.get(cat, 0.0) + self_time(e)
    top = sorted(events, key=self_time, reverse=True)[:rows]
    table = [{"kernel": e.key[:90], "self_ms": round(self_time(e) / 1e3, 2), "calls": e.count,
              "pct": round(100 * self_time(e) / total, 1)} for e in top]
    return {"measure": key, "total_ms": round(total / 1e3, 1),
            "by_category_pct": {k: round(100 * v / total, 1) for k, v in sorted(categories.items(),
                                                                              key=lambda kv: -kv[1])},
            "top": table}


def flattened_batches(rows, groups, device) -> list[dict]:
    """The stock padding-free batches: transformers' DataCollatorWithFlattening as a user sets it up (one row per
    batch, position ids restarting per sample, the first label of each sample -100), use_cache=False; with SDPA,
    transformers builds the block-diagonal mask from the position ids."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    out = []
    for idx in groups:
        batch = collate([{"input_ids": rows[i], "labels": rows[i]} for i in idx])
        out.append({k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)} | {"use_cache": False})
    return out


def train_with_make_trainer(model, tok, rows, tokens_per_step: int, checkpointed: int, chunk: int,
                            tiled_mlp: int | None, offload: bool, warmup: int = 2) -> dict:
    """Ours as a learner runs it: qadapter_utils.train.make_trainer with the fast switches (packed attention,
    chunked loss, tokens_per_step and checkpoint_layers from the planner, tiled MLP and offloaded checkpoints when
    asked), constant learning rate 2e-4, gradient clipping 1.0, the Trainer's optimizer (paged AdamW 8-bit on
    CUDA). `warmup` steps of a first trainer warm the kernels; a second trains one epoch, timed by make_trainer's
    own StepStats callback (per step, data loading excluded; peak allocated since training began)."""
    import tempfile

    from qadapter_utils.train import StepStats, make_trainer, step_stats

    data = [{"input_ids": r, "labels": r} for r in rows]
    # on CUDA make_trainer's own defaults switch on the chunked loss and packed attention (what is measured is
    # what a learner gets without asking); the CPU smoke test asks for them to run the same code paths
    switched = {} if on_cuda() else dict(chunked_loss=True, packed_attention=True)
    common = dict(packing=True, max_length=None, chunk_size=chunk, **switched, tiled_mlp=tiled_mlp,
                  offload_checkpoints=offload, checkpoint_layers=checkpointed,
                  tokens_per_step=tokens_per_step, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", logging_steps=10**6, disable_tqdm=True)
    with tempfile.TemporaryDirectory(prefix="rvp-") as folder:
        warm = make_trainer(model, tok, data, max_steps=warmup, output_dir=f"{folder}/warm", **common)
        warm.train()
        del warm
        release()
        trainer = make_trainer(model, tok, data, max_steps=-1, num_train_epochs=1, output_dir=f"{folder}/run",
                               **common)
        trainer.train()
    stats = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepStats))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    seconds = sum(stats.step_seconds)
    tokens = sum(len(r) for r in rows)
    out = {"real_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "steps": len(stats.step_seconds), "peak_bytes": stats.peak_bytes, "peak_gib": gib(stats.peak_bytes),
           "peak_measure": stats.memory_kind, "median_step_s": round(step_stats(trainer)["seconds per step"], 4),
           "train_loss": round(trainer.state.log_history[-1].get("train_loss", float("nan")), 4),
           "finite": all(math.isfinite(x) for x in losses)}
    del trainer
    release()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the planner: tokens per step and checkpointed layers for a memory budget


def plan_for_budget(model, rows, lengths, budget: int, loss_fn, optimizer, dtype, probe_tokens: int,
                    candidates: list[int], device) -> dict:
    """qadapter_utils.memory.plan_tokens_per_step calibrated by three probe steps of ours on this GPU
    (cost_from_probes), then checked on the fullest batch of the plan (verify_plan); leaves the model with the
    plan's checkpointed layers. Returns the plan's summary with the probes."""
    L = num_layers(model)

    def probe(T, c):
        checkpoint_layers(model, c)
        batch = packed_batch(rows, pack_order(lengths, T, seed=123)[0], device)
        one_step(model, batch, loss_fn, optimizer, dtype)  # warm (allocates optimizer state at the first call)
        secs, pk = one_step(model, batch, loss_fn, optimizer, dtype)
        tokens = len(batch["input_ids"][0])
        release()
        return tokens, secs, pk

    def measure(T, c):
        checkpoint_layers(model, c)
        fullest = max(pack_order(lengths, T, seed=0), key=lambda idx: sum(lengths[i] for i in idx))
        batch = packed_batch(rows, fullest, device)
        try:
            return one_step(model, batch, loss_fn, optimizer, dtype)[1]
        except torch.OutOfMemoryError:
            return None
        finally:
            del batch
            optimizer.zero_grad(set_to_none=True)
            release()

    cost = cost_from_probes(probe, L, probe_tokens, base_bytes=allocated_bytes())
    plan = verify_plan(plan_tokens_per_step(cost, budget, lengths, candidates=candidates), measure, max(lengths))
    checkpoint_layers(model, plan.checkpointed_layers)
    return dict(plan.summary(), probes=cost.probes)


# ---------------------------------------------------------------------------------------------------------------
# correctness on the device


@torch.no_grad()
def check_packing_isolation(model, rows, device, dtype) -> dict:
    """Logits of samples packed in one row (ours: varlen attention) against each sample run alone; and the same
    row with plain causal attention over the whole row (naive packing) to show the check can fail."""
    was = model.training
    model.eval()
    picks = [r[:n] for r, n in zip(rows[:3], (61, 250, 130)) if len(r) >= 2]
    try:
        with autocast(dtype):
            alone = [model(input_ids=torch.tensor([r], device=device), use_cache=False).logits[0].float()
                     for r in picks]
            packed = packed_batch(picks, list(range(len(picks))), device)
            packed.pop("labels")
            ours = model(**packed).logits[0].float()
            naive = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_length"))}
            naive["position_ids"] = torch.arange(ours.shape[0], device=device)[None]
            naive_logits = model(**naive).logits[0].float()
        ref = torch.cat(alone)
        err = ((ours - ref).norm() / ref.norm()).item()
        err_naive = ((naive_logits - ref).norm() / ref.norm()).item()
        first = len(picks[0])
        err_first = ((ours[:first] - ref[:first]).norm() / ref[:first].norm()).item()
        err_later = ((ours[first:] - ref[first:]).norm() / ref[first:].norm()).item()
    finally:
        model.train(was)
    # The first sample's attention is the same computation packed or alone: its error is the noise floor of this
    # dtype on this model (different matmul shapes round differently). Leakage would show in the later samples.
    return {"samples": [len(p) for p in picks], "rel_err_packed_vs_alone": err,
            "rel_err_first_sample (noise floor)": err_first, "rel_err_samples_after_the_first": err_later,
            "rel_err_naive_packing_vs_alone": err_naive,
            "ok": err_later <= 3 * err_first + 1e-3 and err_naive > 10 * err_later}


def check_loss_and_grads(model, rows, device, dtype, attention: str, chunk_size: int = 64) -> dict:
    """Ours (packed row, varlen attention, chunked loss) against the plain recipe (padded batch, SDPA with the
    padding mask, model(labels=...).loss) on three short samples: loss and every adapter gradient."""
    picks = [r[:n] for r, n in zip(rows[:3], (61, 250, 130))]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def run(fn):
        for p in params.values():
            p.grad = None
        with autocast(dtype):
            loss = fn()
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in params.items() if p.grad is not None}
        for p in params.values():
            p.grad = None
        return loss.detach().float(), grads

    set_attention(model, "sdpa")
    ref_loss, ref_grads = run(lambda: model(**padded_batch(picks, [0, 1, 2], device)).loss)
    # control: the same plain recipe, one sample per forward pass (the same function, other matmul shapes): its
    # difference from the padded batch is the rounding noise of this dtype on this model
    targets = [len(p) - 1 for p in picks]

    def one_by_one():
        return sum(model(**padded_batch(picks, [i], device)).loss * (n / sum(targets))
                   for i, n in enumerate(targets))

    ctl_loss, ctl_grads = run(one_by_one)
    set_attention(model, attention)
    batch = packed_batch(picks, [0, 1, 2], device)
    loss, grads = run(lambda: causal_lm_loss(model, chunk_size=chunk_size, **batch))

    def rel(a, b):
        return [((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b if b[n].norm() > 0]

    ours_rel, ctl_rel = rel(grads, ref_grads), rel(ctl_grads, ref_grads)
    return {"loss_plain": ref_loss.item(), "loss_ours": loss.item(),
            "rel_err_loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "rel_err_loss_control": abs(ctl_loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "nonzero_grad_tensors": len(ours_rel), "max_rel_err_grad": max(ours_rel, default=None),
            "median_rel_err_grad": sorted(ours_rel)[len(ours_rel) // 2] if ours_rel else None,
            "control_max_rel_err_grad": max(ctl_rel, default=None),
            "control_median_rel_err_grad": sorted(ctl_rel)[len(ctl_rel) // 2] if ctl_rel else None,
            "same_param_set": set(grads) == set(ref_grads)}


# ---------------------------------------------------------------------------------------------------------------
# the benchmark


def mfu(tokens_per_s, n, rate_tflops):
    return round(100 * 4 * n * tokens_per_s / (rate_tflops * 1e12), 1) if rate_tflops else None


def compare(rows: list[dict]) -> list[dict]:
    """Ours against (a) and (b): at the plan's tokens per step (each recipe at its own step size, same memory
    budget) and at equal tokens per step (ours at (b)'s mean step; (b) at ours' step)."""
    by = {r.get("key"): r for r in rows if r.get("tokens_per_s")}
    pairs = [("ours vs (a), each at its own step size", "ours", "a"),
             ("ours vs (b), each at its own step size", "ours", "b"),
             ("ours vs (b), at (b)'s peak (ours' budget = (b)'s measured peak)", "ours at (b)'s peak", "b"),
             ("equal tokens per step: ours vs (b) at (b)'s mean step", "ours at (b)'s tokens/step", "b"),
             ("equal tokens per step: ours vs (b) at ours' step", "ours", "b at ours' tokens/step")]
    out = []
    for text, x, y in pairs:
        if x in by and y in by:
            pk_x, pk_y = by[x].get("peak_bytes"), by[y].get("peak_bytes")
            out.append({"comparison": text, "speedup": round(by[x]["tokens_per_s"] / by[y]["tokens_per_s"], 2),
                        "peak_ratio": round(pk_x / pk_y, 2) if pk_x and pk_y else None})
    return out


def write(out: Path, tag: str, result: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"recipe_vs_peft_{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"recipe_vs_peft_{tag}.md").write_text(markdown(result))


def markdown(res: dict) -> str:
    m = res.get("machine", {})
    rate = res.get("matmul", {}).get("tflops")
    lines = [f"# Recipe vs stock PEFT QLoRA: {m.get('gpu')}", "",
             f"Model {res.get('model')} ({res.get('params_b', '?')} B parameters counted for MFU: "
             f"{res.get('n_for_mfu'):.3g}), 4-bit NF4 + double quant, bf16 compute; LoRA r=16 alpha=32 on q,v; "
             f"paged AdamW 8-bit; torch {m.get('torch')}, transformers {m.get('transformers')}, peft "
             f"{m.get('peft')}, adapters {m.get('adapters')}, bitsandbytes {m.get('bitsandbytes')}. Measured bf16 "
             f"matmul rate: **{rate} TFLOP/s** ({res.get('matmul', {}).get('n')}^3 products, median). "
             "MFU = 4 N tokens/s / rate.", "",
             f"Length mix: {res.get('mix')}", ""]
    rows = res.get("main", [])
    if rows:
        lines += ["| recipe | tokens/step | checkpointed | padding | real tokens/s | peak allocated | MFU | steps | "
                  "vs (a) | vs (b) |", "|---|---|---|---|---|---|---|---|---|---|"]
        base = {r.get("key"): r for r in rows if r.get("tokens_per_s")}
        for r in rows:
            speed = [f"{r['tokens_per_s'] / base[k]['tokens_per_s']:.2f}x" if k in base and r.get("tokens_per_s")
                     else "" for k in ("a", "b")]
            lines.append(f"| {r['name']} | {r.get('tokens_per_step', '')} | {r.get('checkpointed', '')} | "
                         f"{r.get('padding_pct', 0)} % | {r.get('tokens_per_s', r.get('error'))} | "
                         f"{r.get('peak_gib')} GiB | {r.get('mfu_pct')} % | {r.get('steps')} | {speed[0]} | "
                         f"{speed[1]} |")
        lines.append("")
        if not res.get("machine", {}).get("gpu_memory_gib"):
            lines += ["CPU smoke run: the numbers are not GPU numbers; peaks are 0 for the own loops and "
                      "make_trainer's CPU measure (saved activations + adapter state) for ours.", ""]
    if res.get("comparison"):
        lines += ["## Comparisons", "", "| comparison | speed-up | peak ratio |", "|---|---|---|"]
        lines += [f"| {c['comparison']} | {c['speedup']}x | {c['peak_ratio']} |" for c in res["comparison"]]
        lines.append("")
    for key, title in (("ablation", "Ablation of ours (subset of the mix)"),
                       ("methods", "Adapter methods on the 4-bit base (subset of the mix)")):
        if res.get(key):
            lines += [f"## {title}", "", "| run | setting | real tokens/s | peak allocated | MFU |",
                      "|---|---|---|---|---|"]
            for r in res[key]:
                lines.append(f"| {r['name']} | {r.get('setting', '')} | {r.get('tokens_per_s', r.get('error'))} | "
                             f"{r.get('peak_gib')} GiB | {r.get('mfu_pct')} % |")
            lines.append("")
    if res.get("plans"):
        lines += ["## Planner choices", ""]
        for name, p in res["plans"].items():
            lines.append(f"- {name}: {p.get('tokens_per_step')} tokens/step, {p.get('checkpointed_layers')} of "
                         f"{p.get('layers')} layers checkpointed, budget {p.get('budget_gib')} GiB, predicted peak "
                         f"{p.get('predicted_peak_gib')} GiB and {p.get('predicted_tokens_per_s')} tokens/s; "
                         f"verification {p.get('verification')}")
        lines.append("")
        for name, p in res["plans"].items():
            probes = p.get("probes") or {}
            if not probes:
                continue
            what = {"A": "all layers checkpointed", "B": "no layer checkpointed", "C": "all layers checkpointed"}
            lines += [f"Probe steps of the planner ({name}): ours, one packed row each, one warm step timed "
                      f"(single steps, not an epoch)", "", "| probe | real tokens/step | checkpointing | step s | "
                      "tokens/s | peak allocated |", "|---|---|---|---|---|---|"]
            for key, (tokens, secs, pk) in probes.items():
                lines.append(f"| {key} | {tokens} | {what.get(key, '')} | {secs:.3f} | {tokens / secs:.0f} | "
                             f"{gib(pk)} GiB |")
            lines.append("")
    if res.get("checks"):
        lines += ["## Correctness checks on this GPU", "", "```", json.dumps(res["checks"], indent=1, default=str),
                  "```", ""]
    for name, prof in (res.get("profiles") or {}).items():
        lines += [f"## Profile of one step: {name}", "", f"total {prof.get('total_ms')} ms ({prof.get('measure')});"
                  f" by category: {prof.get('by_category_pct')}", "", "| kernel | self ms | calls | % |",
                  "|---|---|---|---|"]
        for t in prof.get("top", []):
            lines.append(f"| `{t['kernel']}` | {t['self_ms']} | {t['calls']} | {t['pct']} |")
        lines.append("")
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    ap.add_argument("--quick", action="store_true", help="smoke test: a short mix, small steps (CPU)")
    ap.add_argument("--time-limit", type=float, default=330.0, help="skip optional parts past this many seconds")
    ap.add_argument("--chunk", type=int, default=2048, help="tokens per chunk of the chunked loss")
    ap.add_argument("--n-seq", type=int, default=mix.N_SEQUENCES, help="sequences in the length mix")
    ap.add_argument("--tiled-mlp", type=int, default=0, help="ours: MLP tiles of this many tokens (0: off)")
    ap.add_argument("--offload", action="store_true", help="ours: checkpoints offloaded to CPU memory")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: ablation,methods,profile,free")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    device = "cuda" if on_cuda() else "cpu"
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    out = Path(args.out)
    tag = gpu_tag()

    if args.quick:
        lengths = mix.sample_lengths(n=24, median=40, lo=8, hi=96)
        batch_size, probe_tokens, candidates = 4, 128, [128, 192, 256, 384, 512]
        subset = 12
    else:
        lengths = mix.sample_lengths(n=args.n_seq)
        batch_size, probe_tokens, candidates = 8, 2048, [2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576]
        subset = 64
    res: dict = {"model": args.model, "machine": machine(), "mix": mix.describe(lengths), "main": [], "plans": {},
                 "checks": {}, "profiles": {}, "ablation": [], "methods": [], "errors": [],
                 "settings": {"batch_size_baseline": batch_size, "chunk": args.chunk, "warmup_steps": 2,
                              "lora": "r=16 alpha=32 dropout=0 on q_proj,v_proj", "optimizer": "paged AdamW 8-bit",
                              "grad_clip": 1.0, "autocast": str(dtype)}}
    log("machine", res["machine"])
    res["matmul"] = matmul_rate()
    log("matmul", res["matmul"])
    rate = res["matmul"]["tflops"] if on_cuda() else None
    res["checks"]["varlen_kernel"] = check_varlen_kernel()
    log("varlen", res["checks"]["varlen_kernel"])
    # the varlen kernel only where it agrees with per-sample SDPA on this GPU
    attention = PACKED_ATTENTION if res["checks"]["varlen_kernel"].get("ok", True) else PACKED_ATTENTION_SDPA

    # ------------------------------------------------------------------ (a) stock PEFT, length-grouped padding
    model, tok = peft_recipe(args.model, dtype)
    vocab = model.config.vocab_size
    rows = mix.token_rows(lengths, vocab)
    total_tokens = sum(lengths)
    N = N_7B if "7b" in args.model else n_params(model)
    res["n_for_mfu"] = N
    res["params_b"] = round(n_params(model) / 1e9, 2)

    def stock(name, batches, tokens_per_step, padding, key):
        opt = paged_adamw_8bit(model)
        try:
            r = train_steps(model, batches, plain_loss, opt, dtype, real_tokens=total_tokens)
        except torch.OutOfMemoryError as err:
            r = {"error": f"out of memory ({str(err)[:120]})"}
        r.update(name=name, key=key, tokens_per_step=tokens_per_step, padding_pct=padding,
                 mfu_pct=mfu(r.get("tokens_per_s"), N, rate))
        res["main"].append(r)
        log(key, r)
        write(out, tag, res)
        del opt
        release()
        return r

    groups = grouped_batches(lengths, batch_size, grouped=True)
    batches = [padded_batch(rows, g, device) for g in groups]
    r = stock("(a) stock PEFT QLoRA, length-grouped padded batches", batches, f"{batch_size} seqs",
              round(100 * mix.batches_padding_fraction(lengths, groups), 1), "a")
    budget = r["peak_bytes"] if on_cuda() else 10 * GIB
    if "profile" not in skip:
        try:
            res["profiles"]["(a) first, longest batch"] = profile_step(model, batches[0], plain_loss,
                                                                       paged_adamw_8bit(model), dtype)
        except Exception as err:  # noqa: BLE001
            res["errors"].append(f"profile baseline: {type(err).__name__}: {err}")
    # (b) the best stock recipe: the same PEFT model, padding-free batches of transformers' own collator, SDPA
    groups = grouped_batches(lengths, batch_size, grouped=False)
    b_tokens = round(total_tokens / len(groups))
    r_b = stock("(b) PEFT + DataCollatorWithFlattening + SDPA", flattened_batches(rows, groups, device),
                f"{batch_size} seqs (mean {b_tokens} tokens)", 0.0, "b")
    budget_b = r_b.get("peak_bytes") if on_cuda() else 10 * GIB
    del model, batches
    release()

    # ------------------------------------------------------------------ ours, through make_trainer
    model, tok, info = ours_recipe(args.model, dtype, "lora", attention=attention)
    info.update(tiled_mlp=args.tiled_mlp or None, offload_checkpoints=args.offload)
    res["settings"]["ours"] = info
    own_loop = contextlib.ExitStack()  # planner probes, checks, profile and ablation run as make_trainer trains
    own_loop.enter_context(no_edge_casts(model))
    if args.tiled_mlp:
        tile_mlp(model, args.tiled_mlp)
    loss_fn = chunked_loss(args.chunk)
    if args.offload:
        plain_chunked = loss_fn

        def loss_fn(model, batch):  # the probes run as make_trainer(offload_checkpoints=True) will
            with offload_checkpoints():
                return plain_chunked(model, batch)
    try:
        res["checks"]["packing_isolation"] = check_packing_isolation(model, rows, device, dtype)
        res["checks"]["loss_and_grads_vs_plain"] = check_loss_and_grads(model, rows, device, dtype,
                                                                         info["attention"])
    except Exception as err:  # noqa: BLE001
        res["errors"].append(f"checks: {type(err).__name__}: {err}")
    log("checks", res["checks"])
    write(out, tag, res)

    def run_ours(name, budget_bytes, key, tokens_per_step=None):
        """Plan for the budget (probe steps on this model), then train one epoch through make_trainer; with
        tokens_per_step given, the planner only chooses the checkpointed layers for that step size."""
        opt = paged_adamw_8bit(model)
        plan = plan_for_budget(model, rows, lengths, budget_bytes, loss_fn, opt, dtype, probe_tokens,
                               [tokens_per_step] if tokens_per_step else candidates, device)
        del opt
        release()
        res["plans"][key] = plan
        log("plan", key, {k: v for k, v in plan.items() if k != "probes"})
        r = train_with_make_trainer(model, tok, rows, plan["tokens_per_step"], plan["checkpointed_layers"],
                                    args.chunk, args.tiled_mlp or None, args.offload)
        r.update(name=name, key=key, tokens_per_step=plan["tokens_per_step"], padding_pct=0.0,
                 checkpointed=f"{plan['checkpointed_layers']}/{plan['layers']}",
                 mfu_pct=mfu(r["tokens_per_s"], N, rate),
                 within_budget=r["peak_bytes"] <= budget_bytes if on_cuda() else None)
        res["main"].append(r)
        log(key, r)
        write(out, tag, res)
        return plan

    parts = [("ours: make_trainer, budget = (a)'s peak", budget, "ours", None),
             ("ours: make_trainer, budget = (b)'s peak", budget_b, "ours at (b)'s peak", None),
             ("ours: make_trainer at (b)'s tokens per step", budget, "ours at (b)'s tokens/step",
              max(b_tokens, max(lengths)))]
    if "free" not in skip:
        free = int(0.85 * torch.cuda.get_device_properties(0).total_memory) if on_cuda() else 20 * GIB
        parts.append((f"ours: make_trainer without a memory limit ({gib(free)} GiB)", free, "ours, no limit", None))
    for name, budget_bytes, key, tokens in parts:
        if key != "ours" and time.perf_counter() - t_start > args.time_limit:
            res["errors"].append(f"{key}: skipped (time limit)")
            continue
        try:
            run_ours(name, budget_bytes, key, tokens)
        except Exception as err:  # noqa: BLE001
            res["errors"].append(f"{key}: {type(err).__name__}: {str(err)[:300]}")
            log("error", key, err)
        release()
    plan = res["plans"].get("ours") or {}
    if "profile" not in skip and plan:
        try:
            checkpoint_layers(model, plan["checkpointed_layers"])
            fullest = max(pack_order(lengths, plan["tokens_per_step"]), key=lambda g: sum(lengths[i] for i in g))
            res["profiles"]["ours (fullest batch)"] = profile_step(model, packed_batch(rows, fullest, device),
                                                                   loss_fn, paged_adamw_8bit(model), dtype)
        except Exception as err:  # noqa: BLE001
            res["errors"].append(f"profile ours: {type(err).__name__}: {err}")
    write(out, tag, res)

    # ------------------------------------------------------------------ ablation of ours (subset, fixed shape)
    sub_lengths, sub_rows = lengths[:subset], rows[:subset]
    sub_tokens = sum(sub_lengths)
    if "ablation" not in skip and plan and time.perf_counter() - t_start < args.time_limit:
        T = plan["tokens_per_step"]
        opt = paged_adamw_8bit(model)
        checkpoint_layers(model, num_layers(model))
        variants = [
            ("packed, transformers' SDPA packed mask, plain loss", "sdpa", plain_loss),
            ("packed, varlen attention, plain loss", info["attention"], plain_loss),
            ("packed, varlen attention, chunked loss", info["attention"], loss_fn),
        ]
        for name, attn, fn in variants:
            try:
                set_attention(model, attn)
                groups = pack_order(sub_lengths, T)
                batches = [packed_batch(sub_rows, g, device, varlen=attn == info["attention"]) for g in groups]
                r = train_steps(model, batches, fn, opt, dtype, real_tokens=sub_tokens)
                r.update(name=name, setting=f"{T} tokens/step, all layers checkpointed",
                         mfu_pct=mfu(r["tokens_per_s"], N, rate))
            except Exception as err:  # noqa: BLE001
                r = {"name": name, "error": f"{type(err).__name__}: {str(err)[:200]}"}
            res["ablation"].append(r)
            log("ablation", r)
            batches = None
            release()
        set_attention(model, info["attention"])
        write(out, tag, res)

    # ------------------------------------------------------------------ methods: LoRA vs prefix vs bottleneck
    if "methods" not in skip and plan and time.perf_counter() - t_start < args.time_limit:
        groups_pad = grouped_batches(sub_lengths, batch_size, grouped=True)
        pad_batches = [padded_batch(sub_rows, g, device) for g in groups_pad]
        current = info["adapter"]
        for method, packed_ok in (("lora", True), ("seq_bn", True), ("prefix", False)):
            if time.perf_counter() - t_start > args.time_limit + 60:
                res["errors"].append(f"methods: {method} skipped (time limit)")
                continue
            try:
                if current is not None:
                    model.delete_adapter(current)
                    current = None
                opt = None
                release()
                attention = "eager" if method == "prefix" else "sdpa"
                set_attention(model, attention)
                current = methods.add_adapter(model, method, gradient_checkpointing=True)
                own_loop.enter_context(no_edge_casts(model))  # the new adapter's casts
                opt = paged_adamw_8bit(model)
                checkpoint_layers(model, num_layers(model))
                n_train = sum(p.numel() for p in trainable(model))
                r = train_steps(model, pad_batches, loss_fn, opt, dtype, real_tokens=sub_tokens)
                r.update(name=method, setting=f"padded, length-grouped, batch {batch_size}, all layers "
                         f"checkpointed, {attention} attention, chunked loss", trainable_params=n_train,
                         mfu_pct=mfu(r["tokens_per_s"], N, rate))
                res["methods"].append(r)
                log("method", r)
                if packed_ok:
                    set_attention(model, info["attention"])
                    checkpoint_layers(model, plan["checkpointed_layers"])
                    groups = pack_order(sub_lengths, plan["tokens_per_step"])
                    batches = [packed_batch(sub_rows, g, device) for g in groups]
                    r = train_steps(model, batches, loss_fn, opt, dtype, real_tokens=sub_tokens)
                    r.update(name=method, setting=f"ours: packed {plan['tokens_per_step']} tokens/step, "
                             f"{plan['checkpointed_layers']}/{plan['layers']} checkpointed, varlen, chunked loss",
                             trainable_params=n_train, mfu_pct=mfu(r["tokens_per_s"], N, rate))
                    res["methods"].append(r)
                    log("method", r)
                    batches = None
            except Exception as err:  # noqa: BLE001
                res["methods"].append({"name": method, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                log("method error", method, err)
            release()
            write(out, tag, res)
    # ------------------------------------------------------------------ (b) at ours' tokens per step (equal T)
    own_loop.close()
    del model
    opt = None
    release()
    if plan and time.perf_counter() - t_start < args.time_limit + 60:
        model, tok = peft_recipe(args.model, dtype)
        T = plan["tokens_per_step"]
        stock(f"(b) PEFT + DataCollatorWithFlattening + SDPA at ours' {T} tokens/step",
              flattened_batches(rows, pack_order(lengths, T), device), T, 0.0, "b at ours' tokens/step")
        del model
        release()
    res["comparison"] = compare(res["main"])
    res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write(out, tag, res)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
