"""Colab T4 check: the longest sequence at batch 1 that trains Llama-2-7B-shaped QLoRA under a T4's memory in fp16,
"ours" trained by `qadapter_utils.train.make_trainer` itself.

    python benchmarks/t4_check.py --out benchmarks/results                 # a CUDA GPU (~3 min on an H100)
    python benchmarks/t4_check.py --model tiny --quick --out /tmp/t4       # smoke test of every code path (CPU)

A free Colab T4 has 15 GiB and no bf16. Here any larger CUDA GPU stands in for it: the process is capped with
`torch.cuda.set_per_process_memory_fraction` at T4_TOTAL_GIB - T4_CONTEXT_GIB = 14.75 - 0.6 = 14.15 GiB (the
constants imported from scripts/run_notebooks.py, whose --t4 mode models a T4 the same way: 14.75 GiB reported, of
which the CUDA context holds 0.6 GiB; on the stand-in the context lives outside the cap) and computes in fp16
(4-bit NF4 + double quantization base, fp16 autocast with a GradScaler, as `Trainer(fp16=True)` does). LoRA r=16
(alpha 32) on q_proj, v_proj, gradient checkpointing, paged AdamW 8-bit, batch 1 (one row of that length); each
length trains 2 full optimizer steps (forward, backward, optimizer step); peak = torch.cuda.max_memory_allocated.

- stock PEFT recipe: `prepare_model_for_kbit_training` + `LoraConfig`, loss from `model(..., labels=...)`, in the
  benchmark's own loop (recipe_vs_peft.optimizer_step: autocast, GradScaler, clipping, paged AdamW 8-bit).
- adapters, plain loss: `make_trainer` with none of the fast switches but checkpoint_layers=all (full fp32
  logits), for comparison.
- ours: `make_trainer(..., packing=True, packed_attention=True, chunked_loss=True, checkpoint_layers=all)` (a fresh
  trainer per attempt: the Trainer's paged AdamW 8-bit and GradScaler, constant learning rate 2e-4, clipping 1.0),
  in the cheapest configuration that trains at each length:
  1. chunked loss (`qadapter_utils.loss`: no fp32 logits), non-reentrant checkpointing of every layer, packed
     (varlen) attention;
  2. + tiled_mlp=4096 (`qadapter_utils.fast.tile_mlp`): each layer's MLP runs over 4,096-token tiles, each tile
     checkpointed, so its (tokens x 11,008) intermediates exist for one tile at a time (the MLP is position-wise:
     the same result);
  3. + offload_checkpoints=True (`qadapter_utils.fast.offload_checkpoints`): the forward runs under
     `torch.autograd.graph.save_on_cpu(pin_memory=True)`. Non-reentrant checkpointing saves each layer's input
     through save_for_backward outside its own hooks, so the 32 layer inputs (tokens x 4,096 x 2 bytes each) wait
     in pinned host memory until backward needs them, while what the recomputation saves stays on the GPU.
     (adapters 1.3.0 refuses reentrant checkpointing.)
  Before the search, the full configuration 3 is compared with the plain recipe (full logits, no tiling, no
  offload) on a short sequence: loss and every LoRA gradient (the pieces called directly, as make_trainer calls
  them).

Writes <out>/t4_check_<gpu>.json and .md. The GPU used is named in them: timings are not a T4's, memory is
(allocator peaks do not depend on the card, except that a T4 has no flash-attention varlen kernel: its attention
takes another O(sequence) path). On the CPU (smoke test) the peak is make_trainer's CPU measure (saved activations +
adapter state), 0 for the own loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recipe_vs_peft as rv  # noqa: E402  (also puts the repository root on sys.path)

sys.path.insert(0, str(HERE.parent / "scripts"))
from run_notebooks import T4_CONTEXT_GIB, T4_TOTAL_GIB  # noqa: E402

from qadapter_utils import methods, models  # noqa: E402
from qadapter_utils.fast import check_varlen_kernel, offload_checkpoints, set_attention, tile_mlp, untile_mlp  # noqa: E402
from qadapter_utils.loss import causal_lm_loss  # noqa: E402

GIB = 2**30
CAP_GIB = round(T4_TOTAL_GIB - T4_CONTEXT_GIB, 2)  # PyTorch's allocator on a T4: what it reports less the context
MLP_TILE = 4096
CHUNK = 2048


def load_fp16(model_name: str, dtype):
    """(model, tokenizer): the 4-bit model with compute dtype `dtype`. For "random:<shape>" the checkpoint
    load_model already saved (bf16) is loaded with dtype=fp16 instead of building a second one, with the tiny
    tokenizer load_model gives random shapes."""
    if not model_name.startswith("random:"):
        return models.load_model(model_name, bits=4, compute_dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.random_checkpoint(model_name.split(":", 1)[1], torch.bfloat16)
    device_map = {"": 0} if rv.on_cuda() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=models.bnb_config(4, compute_dtype=dtype),
                                                 dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(models.TINY_DIR)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def set_checkpointing(model, reentrant: bool = False):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not hasattr(model, "_require_grads_hook"):
        model.enable_input_require_grads()


def trainer_settings(model, name: str) -> dict:
    """make_trainer's switches for configuration `name` (CONFIGS), or for the plain adapters recipe ("plain")."""
    layers = model.config.num_hidden_layers
    if name == "plain":  # explicitly off: on CUDA make_trainer switches the chunked loss and packed attention on
        return dict(checkpoint_layers=layers, chunked_loss=False, packed_attention=False)
    return dict(packed_attention=True, chunked_loss=True, chunk_size=CHUNK, checkpoint_layers=layers,
                tiled_mlp=MLP_TILE if "tiled" in name else None, offload_checkpoints="offload" in name)


CONFIGS = ["packed attention + chunked loss", "packed attention + chunked loss + tiled MLP",
           "packed attention + chunked loss + tiled MLP + offloaded checkpoints"]


def random_row(length: int, vocab: int, device, seed: int = 0) -> dict:
    """One row of `length` random tokens (memory.random_batch sizes a batch from a model instead)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, length), generator=g)
    ids[0, 0] = 1
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}


def search_lengths(res, model, lengths, loss_fn, opt, dtype, vocab, device, recipe: str, config: str) -> None:
    """Try `lengths` in increasing order until one fails; record each run and the longest that trained."""
    for n in lengths:
        r = attempt(model, n, loss_fn, opt, dtype, vocab, device)
        r.update(recipe=recipe, config=config, length=n)
        res["runs"].append(r)
        print(r, flush=True)
        if not r["ok"]:
            break
        res["longest"][recipe] = n


def oom_message(err: RuntimeError) -> str | None:
    """The first line of an allocation failure (torch.OutOfMemoryError, pinned memory exhausted, cuBLAS allocation
    failures), None for any other error."""
    text = str(err)
    if (isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower()
            or "CUBLAS_STATUS_ALLOC_FAILED" in text):
        return "out of memory: " + text.split("\n")[0][:120]
    return None


def attempt(model, length, loss_fn, optimizer, dtype, vocab, device, steps: int = 2) -> dict:
    """`steps` training steps at batch 1 x `length`; {"ok", "peak_gib", "step_s", "loss"} or the error."""
    rv.release()
    rv.reset_peak()
    error = None
    try:
        batch = random_row(length, vocab, device)
        scaler = torch.amp.GradScaler("cuda") if (rv.on_cuda() and dtype == torch.float16) else None
        times = []
        for _ in range(steps):
            seconds, _ = rv.one_step(model, batch, loss_fn, optimizer, dtype, scaler=scaler)
            times.append(seconds)
        result = {"ok": True, "peak_gib": rv.gib(rv.peak_bytes()), "step_s": round(times[-1], 2)}
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        error = oom_message(err)
        if error is None:
            raise
    if error is not None:
        batch = None
        optimizer.zero_grad(set_to_none=True)
        for p in rv.trainable(model):
            p.grad = None
        peak = rv.peak_bytes()
        rv.release()
        return {"ok": False, "error": error, "peak_gib": rv.gib(peak)}
    return result


def attempt_trainer(model, tokenizer, length: int, vocab: int, settings: dict, steps: int = 2) -> dict:
    """`steps` optimizer steps of a fresh `make_trainer(..., **settings)` on one row of `length` tokens (batch 1);
    {"ok", "peak_gib", "step_s", "loss"} or the error. Peak: torch.cuda.max_memory_allocated over the whole run
    on CUDA, make_trainer's CPU measure (StepStats) on the CPU."""
    import tempfile

    from qadapter_utils.train import StepStats, make_trainer

    untile_mlp(model)  # make_trainer tiles when asked, and leaves the tiles in place afterwards
    set_attention(model, "sdpa")  # likewise packed attention
    row = random_row(length, vocab, "cpu")["input_ids"][0].tolist()
    rv.release()
    rv.reset_peak()
    error, trainer = None, None
    try:
        with tempfile.TemporaryDirectory(prefix="t4-") as folder:
            trainer = make_trainer(model, tokenizer, [{"input_ids": row, "labels": row}], packing=True,
                                   max_length=None, max_steps=steps, per_device_train_batch_size=1,
                                   learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                                   weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", logging_steps=1,
                                   disable_tqdm=True, output_dir=folder, **settings)
            trainer.train()
        stats = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepStats))
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        peak = rv.peak_bytes() if rv.on_cuda() else stats.peak_bytes
        result = {"ok": True, "peak_gib": rv.gib(peak), "peak_measure": stats.memory_kind,
                  "step_s": round(stats.step_seconds[-1], 2), "steps": len(stats.step_seconds),
                  "loss": losses[-1] if losses else None}
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        error = oom_message(err)
        if error is None:
            raise
    trainer = None
    for p in rv.trainable(model):
        p.grad = None
    if error is not None:
        peak = rv.peak_bytes()
        rv.release()
        return {"ok": False, "error": error, "peak_gib": rv.gib(peak)}
    rv.release()
    return result


def compare_full_vs_plain(model, dtype, vocab, device, length: int = 512) -> dict:
    """Loss and LoRA gradients of the plain recipe (full logits, non-reentrant checkpointing) against ours in its
    fullest configuration (chunked loss in chunks of 128, MLP tiles of 128, offloaded checkpoints) on
    one sequence of `length` tokens."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = random_row(length, vocab, device, seed=7)

    def run(fn):
        for p in params.values():
            p.grad = None
        with rv.autocast(dtype):
            loss = fn()
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in params.items() if p.grad is not None}
        for p in params.values():
            p.grad = None
        return loss.detach().float().item(), grads

    set_checkpointing(model)
    untile_mlp(model)
    ref_loss, ref = run(lambda: model(**batch).loss)
    tile_mlp(model, 128)

    def ours():
        with offload_checkpoints():
            return causal_lm_loss(model, chunk_size=128, **batch)

    with rv.no_edge_casts(model):  # as make_trainer trains in mixed precision
        loss, grads = run(ours)
    untile_mlp(model)
    rel = [((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref if ref[n].norm() > 0]
    return {"length": length, "loss_plain": ref_loss, "loss_ours": loss,
            "rel_err_loss": abs(loss - ref_loss) / abs(ref_loss), "nonzero_grad_tensors": len(rel),
            "max_rel_err_grad": max(rel), "median_rel_err_grad": sorted(rel)[len(rel) // 2],
            "same_param_set": set(grads) == set(ref)}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Colab T4 check ({res['cap_gib']} GiB cap, fp16) on {m.get('gpu')}", "",
             f"Model {res['model']}, 4-bit NF4 + double quant, fp16 compute + GradScaler; LoRA r=16 alpha=32 on q,v; "
             f"paged AdamW 8-bit; batch 1; 2 optimizer steps per length (ours and the plain adapters recipe through "
             f"`make_trainer`, stock PEFT in the benchmark's loop); cap `set_per_process_memory_fraction` = "
             f"{res['cap_gib']} GiB (a T4's {T4_TOTAL_GIB} GiB less {T4_CONTEXT_GIB} GiB of CUDA context). "
             f"torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, peft {m.get('peft')}, adapters {m.get('adapters')}, bitsandbytes "
             f"{m.get('bitsandbytes')}.", "",
             "| recipe | configuration | sequence length | trains | peak allocated | step time (this GPU) |",
             "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['recipe']} | {r.get('config', '')} | {r['length']} | "
                     f"{'yes' if r.get('ok') else 'no: ' + str(r.get('error', ''))[:60]} | {r.get('peak_gib')} GiB | "
                     f"{r.get('step_s', '')} s |")
    lines += ["", "Longest that trains: " + ", ".join(f"{k}: {v}" for k, v in res["longest"].items()), ""]
    if res.get("checks"):
        lines += ["## Same result as the plain recipe (short sequence, on this GPU)", "", "```",
                  json.dumps(res["checks"], indent=1), "```", ""]
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(lines)


def write(out: Path, res: dict):
    out.mkdir(parents=True, exist_ok=True)
    tag = rv.gpu_tag()
    (out / f"t4_check_{tag}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"t4_check_{tag}.md").write_text(markdown(res))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB)
    ap.add_argument("--time-limit", type=float, default=200.0)
    ap.add_argument("--peft-lengths", default="8192,10240,12288,16384")
    ap.add_argument("--ours-lengths", default="16384,24576,32768,40960,49152,65536")
    ap.add_argument("--plain-lengths", default="12288,16384")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = "cuda" if rv.on_cuda() else "cpu"
    dtype = torch.float16 if rv.on_cuda() else torch.float32
    global MLP_TILE
    if args.quick:
        peft_lengths, ours_lengths, plain_lengths, MLP_TILE = [64, 128], [128, 256, 384], [128], 32
    else:
        peft_lengths, ours_lengths, plain_lengths = ([int(x) for x in a.split(",") if x] for a in (
            args.peft_lengths, args.ours_lengths, args.plain_lengths))
    if rv.on_cuda():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    res = {"model": args.model, "machine": rv.machine(), "cap_gib": args.cap_gib, "runs": [], "longest": {},
           "checks": {}, "errors": []}
    print(res["machine"], flush=True)

    # ---------------------------------------------------------------- stock PEFT recipe
    try:
        model, _ = load_fp16(args.model, dtype)
        model, _ = rv.peft_recipe(args.model, dtype, model=model)
        vocab = model.config.vocab_size
        opt = rv.paged_adamw_8bit(model)
        search_lengths(res, model, peft_lengths, rv.plain_loss, opt, dtype, vocab, device, "stock PEFT",
                       "plain loss, reentrant checkpointing")
        del model, opt
    except Exception as err:  # noqa: BLE001
        res["errors"].append(f"peft: {type(err).__name__}: {str(err)[:300]}")
    rv.release()
    write(Path(args.out), res)

    # ---------------------------------------------------------------- ours, through make_trainer
    model, tokenizer = load_fp16(args.model, dtype)
    set_attention(model, "sdpa")
    methods.add_adapter(model, "lora", gradient_checkpointing=True)
    model.train()
    vocab = model.config.vocab_size
    res["checks"]["varlen_kernel"] = check_varlen_kernel()
    try:
        res["checks"]["full configuration vs plain recipe"] = compare_full_vs_plain(model, dtype, vocab, device,
                                                                                    length=128 if args.quick else 512)
    except Exception as err:  # noqa: BLE001
        res["errors"].append(f"check: {type(err).__name__}: {str(err)[:300]}")
    print(res["checks"], flush=True)
    write(Path(args.out), res)

    def run(n, recipe, config, settings) -> bool:
        r = attempt_trainer(model, tokenizer, n, vocab, settings)
        r.update(recipe=recipe, config=config, length=n)
        res["runs"].append(r)
        print(r, flush=True)
        write(Path(args.out), res)
        if r["ok"]:
            res["longest"][recipe] = n
        return r["ok"]

    # the plain adapters recipe (make_trainer without the fast switches), for comparison
    for n in plain_lengths:
        if not run(n, "adapters, plain loss", "make_trainer: full logits, every layer checkpointed",
                   trainer_settings(model, "plain")):
            break

    first = 0
    for n in ours_lengths:
        if time.perf_counter() - t0 > args.time_limit:
            res["errors"].append(f"ours: lengths from {n} not tried (time limit {args.time_limit} s)")
            break
        trained = False
        for i in range(first, len(CONFIGS)):
            if run(n, "ours", "make_trainer: " + CONFIGS[i], trainer_settings(model, CONFIGS[i])):
                trained = True
                if not args.quick:  # the smoke test runs every configuration at every length
                    first = i
                    break
        if not trained:
            break
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write(Path(args.out), res)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
