"""Measure the peak GPU memory of adapter training on a Llama-2-7B-shaped model (random weights) over a sweep of
sequence lengths, batch sizes, gradient checkpointing, 4/8-bit bases and adapter methods; write the table that
tests/test_memory.py checks the estimator (qadapter_utils.memory.estimate_training_memory) against.

    python benchmarks/memory_sweep.py                       # the full sweep on a CUDA GPU (~10 min on an H100)
    python benchmarks/memory_sweep.py --only 24 25 26 27    # some rows (indices of SWEEP)
    python benchmarks/memory_sweep.py --model random:tiny --quick --out /tmp/sweep   # a smoke test on the CPU
    python benchmarks/memory_sweep.py --rewrite benchmarks/results/memory_h100.json  # redo the .md's estimates

Each row: load the base once per (bits, double quant, compute dtype), add the adapter exactly as the notebooks do
(`qadapter_utils.methods.add_adapter`: fp32 adapter weights, non-reentrant gradient checkpointing, eager attention
for prefix tuning), run `--steps` full training steps (forward, backward, optimizer step) on random tokens through
`qadapter_utils.memory.measure_training_memory`, record the peak `torch.cuda.max_memory_allocated()` (model
included, CUDA context not), delete the adapter. Every row starts as in a fresh process: SDPA attention and no
`enable_input_require_grads` hook left by an earlier row (adapters registers one per gradient_checkpointing_enable
call); each row records `attn_implementation` and `input_requires_grad` as they were.
Writes <out>/memory_<gpu>.json (rows + machine + versions) and <out>/memory_<gpu>.md (the table with the estimate
beside each measurement), and one JSON line per row to <out>/rows.jsonl as it goes. Rows named in --timeline
also get an op-by-op memory timeline (timelines.json: phase, in backward or not, op, bytes allocated after it, peak
during it), which is how
the estimator's terms were found.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qadapter_utils import memory, methods, models  # noqa: E402

GIB = 2**30

# (bits, double_quant, method, overrides, gradient checkpointing, batch, seq, optimizer)
# Covers seq 256-2048, batch 1-4, checkpointing on/off, 4/8-bit, LoRA small/large rank on attention / all linear
# layers, prefix tuning, sequential and parallel bottleneck adapters, double quantization and bnb optimizers.
SWEEP = [
    # --- 4-bit NF4 + double quant, LoRA r=16 on q,v ("lora"), AdamW -------------------------------------------
    (4, True, "lora", {}, True, 1, 256, "adamw_torch"),
    (4, True, "lora", {}, True, 1, 512, "adamw_torch"),
    (4, True, "lora", {}, True, 1, 1024, "adamw_torch"),
    (4, True, "lora", {}, True, 1, 2048, "adamw_torch"),
    (4, True, "lora", {}, True, 2, 512, "adamw_torch"),
    (4, True, "lora", {}, True, 4, 512, "adamw_torch"),
    (4, True, "lora", {}, True, 4, 1024, "adamw_torch"),
    (4, True, "lora", {}, True, 4, 2048, "adamw_torch"),
    (4, True, "lora", {}, True, 1, 4096, "adamw_torch"),
    (4, True, "lora", {}, True, 1, 8192, "adamw_torch"),
    (4, True, "lora", {}, False, 1, 256, "adamw_torch"),
    (4, True, "lora", {}, False, 1, 512, "adamw_torch"),
    (4, True, "lora", {}, False, 1, 2048, "adamw_torch"),
    (4, True, "lora", {}, False, 2, 1024, "adamw_torch"),
    (4, True, "lora", {}, False, 4, 512, "adamw_torch"),
    (4, True, "lora", {}, False, 4, 2048, "adamw_torch"),
    # --- LoRA: small rank, large rank, all linear layers ---------------------------------------------------------
    (4, True, "lora", {"r": 8, "alpha": 16}, True, 2, 1024, "adamw_torch"),
    (4, True, "lora", {"r": 256, "alpha": 512}, True, 4, 512, "adamw_torch"),
    (4, True, "lora_all", {}, True, 2, 1024, "adamw_torch"),
    (4, True, "lora_all", {}, False, 4, 256, "adamw_torch"),
    (4, True, "lora_all", {"r": 64, "alpha": 128}, True, 1, 512, "adamw_torch"),
    (4, True, "lora_all", {"r": 64, "alpha": 128}, True, 2, 2048, "adamw_torch"),
    (4, True, "lora_all", {"r": 64, "alpha": 128}, False, 2, 512, "adamw_torch"),
    (4, True, "lora_all", {"r": 64, "alpha": 128}, False, 1, 2048, "adamw_torch"),
    # --- prefix tuning, bottleneck adapters ---------------------------------------------------------------------
    (4, True, "prefix", {}, True, 1, 512, "adamw_torch"),
    (4, True, "prefix", {}, True, 2, 2048, "adamw_torch"),
    (4, True, "prefix", {}, False, 1, 1024, "adamw_torch"),
    (4, True, "prefix", {}, False, 4, 512, "adamw_torch"),
    (4, True, "seq_bn", {}, True, 2, 512, "adamw_torch"),
    (4, True, "seq_bn", {}, True, 1, 2048, "adamw_torch"),
    (4, True, "seq_bn", {}, False, 2, 1024, "adamw_torch"),
    (4, True, "par_bn", {}, True, 1, 1024, "adamw_torch"),
    (4, True, "par_bn", {}, False, 2, 512, "adamw_torch"),
    # --- optimizers: 8-bit AdamW, paged 8-bit AdamW (the QLoRA recipe) -----------------------------------------
    (4, True, "lora", {}, True, 4, 512, "paged_adamw_8bit"),
    (4, True, "lora", {}, False, 4, 512, "adamw_8bit"),
    (4, True, "par_bn", {}, True, 1, 1024, "paged_adamw_8bit"),
    (4, True, "lora_all", {"r": 64, "alpha": 128}, True, 2, 2048, "paged_adamw_8bit"),
    # --- 4-bit without double quantization ---------------------------------------------------------------------
    (4, False, "lora", {}, True, 2, 1024, "adamw_torch"),
    (4, False, "lora_all", {}, False, 1, 1024, "adamw_torch"),
    # --- adapter weights in the compute dtype (bf16) instead of fp32: no casts at the adapter's edges -----------
    (4, True, "lora", {"adapter_dtype": "bfloat16"}, False, 2, 1024, "adamw_torch"),
    (4, True, "seq_bn", {"adapter_dtype": "bfloat16"}, True, 2, 1024, "adamw_torch"),
    # --- fp16 compute (as on a T4, which has no bf16) -------------------------------------------------------------
    (4, True, "lora", {"compute_dtype": "float16"}, True, 1, 4096, "paged_adamw_8bit"),
    (4, True, "lora_all", {"compute_dtype": "float16"}, False, 1, 1024, "adamw_torch"),
    (4, True, "prefix", {"compute_dtype": "float16"}, True, 2, 512, "adamw_torch"),
    # --- 8-bit LLM.int8() base -----------------------------------------------------------------------------------
    (8, False, "lora", {}, True, 1, 512, "adamw_torch"),
    (8, False, "lora", {}, True, 4, 512, "adamw_torch"),
    (8, False, "lora", {}, True, 1, 2048, "adamw_torch"),
    (8, False, "lora", {}, False, 2, 512, "adamw_torch"),
    (8, False, "lora", {}, False, 1, 1024, "adamw_torch"),
    (8, False, "lora_all", {}, True, 2, 1024, "adamw_torch"),
    (8, False, "prefix", {}, True, 2, 512, "adamw_torch"),
    (8, False, "seq_bn", {}, False, 1, 512, "adamw_torch"),
    (8, False, "par_bn", {}, True, 2, 256, "adamw_torch"),
]
QUICK = [  # for the CPU smoke test: a few rows of each kind
    (4, True, "lora", {}, True, 2, 64, "adamw_torch"),
    (4, True, "lora", {}, False, 2, 64, "adamw_torch"),
    (4, True, "lora_all", {"r": 8, "alpha": 16}, False, 1, 128, "adamw_torch"),
    (4, True, "prefix", {}, True, 1, 64, "adamw_torch"),
    (4, True, "seq_bn", {}, False, 2, 64, "adamw_8bit"),
    (4, True, "par_bn", {}, True, 1, 64, "paged_adamw_8bit"),
    (4, False, "lora", {}, True, 1, 64, "adamw_torch"),
    (8, False, "lora", {}, True, 2, 64, "adamw_torch"),
    (8, False, "prefix", {}, False, 1, 64, "adamw_torch"),
    (4, True, "lora", {"compute_dtype": "bfloat16"}, True, 1, 64, "adamw_torch"),
]


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def gpu_slug(name: str) -> str:
    name = re.sub(r"^NVIDIA\s+", "", name)
    match = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (match.group(1) if match else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")).lower()


def versions() -> dict:
    from qadapter_utils.env import installed_version

    out = {p: installed_version(p) for p in ("torch", "transformers", "adapters", "bitsandbytes", "accelerate")}
    out["python"] = platform.python_version()
    out["cuda"] = torch.version.cuda
    return out


def load(model_name: str, bits: int, double_quant: bool, compute_dtype=None):
    try:
        model, _ = models.load_model(model_name, bits=bits, double_quant=double_quant, compute_dtype=compute_dtype)
    except (models.ModelLoadError, OSError) as err:  # the tiny tokenizer may be missing in a bare checkout
        if not model_name.startswith("random:"):
            raise
        print(f"  load_model failed ({type(err).__name__}); loading the random checkpoint without a tokenizer")
        from transformers import AutoModelForCausalLM

        from qadapter_utils.env import default_compute_dtype

        dtype = getattr(torch, compute_dtype) if compute_dtype else default_compute_dtype()
        path = models.random_checkpoint(model_name.split(":", 1)[1], dtype)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=models.bnb_config(bits, "nf4", double_quant, dtype), dtype=dtype,
            device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    return model


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


class Timeline:
    """Op-by-op memory while `mode` is active (CUDA): after every aten op a row (label, in backward, op, bytes
    allocated after it, peak since the previous op); the caller sets `label[0]` (a phase, a step)."""

    def __init__(self, label="setup"):
        from torch.utils._python_dispatch import TorchDispatchMode

        rows = self.rows = []
        self.label = [label]
        current = self.label

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                rows.append((current[0], torch._C._current_autograd_node() is not None, func.overloadpacket.__name__,
                             torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
                torch.cuda.reset_peak_memory_stats()
                return out

        self.mode = Mode()

    def moved(self, label, threshold: int = 2**20) -> list:
        """The rows of `label` (without it) where memory moved by more than `threshold` (the record stays small)."""
        out, prev = [], None
        for r in self.rows:
            if r[0] != label:
                continue
            if prev is None or abs(r[3] - prev) > threshold or r[4] - max(r[3], prev) > threshold:
                out.append(list(r[1:]))
            prev = r[3]
        return out


def timeline_step(model, batch_size, seq_len, optimizer_name, steps=2) -> list:
    """Two training steps under the op-by-op timeline; returns the rows of the last step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = memory.make_optimizer(optimizer_name, params)
    batch = memory.random_batch(model, batch_size, seq_len)
    model.train()
    tl = Timeline()
    for _step in range(steps):
        tl.rows.clear()
        torch.cuda.reset_peak_memory_stats()
        with tl.mode:
            tl.label[0] = "forward"
            loss = model(**batch).loss
            tl.label[0] = "backward"
            loss.backward()
            del loss
            tl.label[0] = "optimizer"
            opt.step()
            opt.zero_grad(set_to_none=True)
    del opt
    for p in params:
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return tl.rows


def row_key(spec) -> str:
    bits, dq, method, overrides, gc_on, batch, seq, optimizer = spec
    extra = ",".join(f"{k}={v}" for k, v in overrides.items())
    return (f"{bits}bit{'+dq' if bits == 4 and dq else ''} {method}{'(' + extra + ')' if extra else ''} "
            f"gc={'on' if gc_on else 'off'} b={batch} s={seq} {optimizer}")


def run(args) -> list[dict]:
    specs = dict(enumerate(QUICK if args.quick else SWEEP))  # index in the sweep -> spec
    if args.only:
        specs = {i: specs[i] for i in args.only}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    timelines = {}
    jsonl = open(out_dir / "rows.jsonl", "a")
    def group_key(spec):
        return spec[0], spec[1], spec[3].get("compute_dtype")

    for key in dict.fromkeys(group_key(s) for s in specs.values()):
        bits, dq, compute = key
        group = [(i, s) for i, s in specs.items() if group_key(s) == key]
        if time.time() - t0 > args.deadline:
            print(f"deadline reached: skipping {len(group)} rows of {bits}-bit")
            continue
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t = time.time()
        model = load(args.model, bits, dq, compute)
        base = allocated()
        print(f"loaded {args.model} {bits}-bit dq={dq} {compute or ''} in {time.time() - t:.1f}s: "
              f"{base / GIB:.3f} GiB allocated; tensor_bytes {memory.tensor_bytes(model) / GIB:.3f} GiB", flush=True)
        for i, spec in group:
            if time.time() - t0 > args.deadline:
                print(f"deadline reached: skipping row {i}")
                continue
            _, _, method, overrides, gc_on, batch, seq, optimizer = spec
            name = f"row{i}"
            record = dict(index=i, key=row_key(spec), model=args.model, bits=bits, double_quant=dq,
                          quant_type="nf4", method=method, overrides=overrides, gradient_checkpointing=gc_on,
                          batch_size=batch, seq_len=seq, optimizer=optimizer, steps=args.steps)
            try:
                methods.remove_input_require_grads_hooks(model)  # each row starts as in a fresh process
                if model.config._attn_implementation != "sdpa":  # add_adapter switches prefix tuning to eager
                    model.set_attn_implementation("sdpa")
                config_overrides = {k: v for k, v in overrides.items() if k not in ("adapter_dtype", "compute_dtype")}
                adapter_dtype = getattr(torch, overrides.get("adapter_dtype", "")) if "adapter_dtype" in overrides \
                    else "auto"
                methods.add_adapter(model, method, name, adapter_dtype=adapter_dtype, gradient_checkpointing=gc_on,
                                    **config_overrides)
                record["adapter_config"] = model.adapters_config.get(name).to_dict()
                record["attn_implementation"] = model.config._attn_implementation
                record["input_requires_grad"] = any(  # the hook gradient checkpointing adds to the embeddings
                    getattr(hook, "__name__", "") == "make_inputs_require_grads"
                    for hook in model.get_input_embeddings()._forward_hooks.values())
                trainable = [p for p in model.parameters() if p.requires_grad]
                record["adapter_params"] = sum(p.numel() for p in trainable)
                record["adapter_dtype"] = str(trainable[0].dtype).replace("torch.", "")
                record["compute_dtype"] = str(methods.compute_dtype(model)).replace("torch.", "")
                record["allocated_with_adapter"] = allocated()
                t = time.time()
                result = memory.measure_training_memory(model, batch, seq, steps=args.steps, optimizer=optimizer)
                record["seconds"] = round(time.time() - t, 2)
                record.update(peak_allocated=result["peak_allocated"], peak_reserved=result["peak_reserved"],
                              loaded=result["loaded"], measure=result["measure"], phases=result["phases"],
                              breakdown=result["breakdown"])
                if i in args.timeline and torch.cuda.is_available():
                    timelines[i] = timeline_step(model, batch, seq, optimizer)
                    (out_dir / "timelines.json").write_text(json.dumps(timelines))
            except torch.cuda.OutOfMemoryError as err:
                record["error"] = f"OutOfMemoryError: {str(err).splitlines()[0]}"
            except Exception as err:  # keep the sweep going; the row records what failed
                record["error"] = f"{type(err).__name__}: {err}"
            finally:
                if name in getattr(model, "adapters_config", {}):
                    model.delete_adapter(name)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                record["allocated_after_delete"] = allocated()
            rows.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            peak = record.get("peak_allocated")
            print(f"[{i:2d}] {record['key']:<58} "
                  + (f"peak {peak / GIB:7.3f} GiB  ({record['seconds']:.1f}s)" if peak else record.get("error", "")),
                  flush=True)
        del model
    return rows


def write_tables(rows: list[dict], out_dir: Path, name: str, device: dict, estimate: bool = True,
                 doc: dict | None = None) -> Path:
    """Write memory_<gpu>.json (unless `doc` is given: then only the .md is rewritten from it) and .md."""
    slug = gpu_slug(name)
    path = out_dir / f"memory_{slug}.json"
    if doc is None:
        doc = {"gpu": name, "device": device, "versions": versions(), "rows": rows}
        path.write_text(json.dumps(doc, indent=1))
    lines = [f"# Peak training memory, measured on {name}", "",
             f"`torch.cuda.max_memory_allocated()` over {rows[0]['steps'] if rows else '?'} training steps "
             f"(model included, CUDA context not), Llama-2-7B shape, random weights, adapters added with "
             f"`qadapter_utils.methods.add_adapter` (fp32 adapter weights). Estimate: "
             f"`qadapter_utils.memory.estimate_training_memory`. Versions: "
             + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".", "",
             *([doc["notes"], ""] if doc.get("notes") else []),
             "| # | base | adapter | grad. ckpt | batch | seq | optimizer | measured GiB | estimated GiB | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "peak_allocated" not in r:
            lines.append(f"| {r['index']} | {r['bits']}-bit | {r['method']} | | {r['batch_size']} | {r['seq_len']} | "
                         f"{r['optimizer']} | {r.get('error', '')} | | |")
            continue
        try:
            est = memory.estimate_for_row(r) if estimate else float("nan")
        except Exception as exc:  # an estimator problem must not lose the measurements
            print(f"estimate failed for row {r['index']}: {type(exc).__name__}: {exc}")
            est = float("nan")
        err = (est - r["peak_allocated"]) / r["peak_allocated"]
        base = f"{r['bits']}-bit" + (" nf4+dq" if r["bits"] == 4 and r["double_quant"] else
                                     " nf4" if r["bits"] == 4 else "")
        adapter = r["method"] + ("(" + ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) + ")"
                                 if r["overrides"] else "")
        if r["method"] == "prefix" or r.get("attn_implementation", "sdpa") != "sdpa":
            adapter += f" [{r.get('attn_implementation', 'sdpa')} attention]"
        lines.append(f"| {r['index']} | {base} | {adapter} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['batch_size']} | {r['seq_len']} | {r['optimizer']} | {r['peak_allocated'] / GIB:.3f} | "
                     f"{est / GIB:.3f} | {100 * err:+.1f}% |")
    (out_dir / f"memory_{slug}.md").write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:llama2-7b")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the short CPU smoke-test sweep")
    parser.add_argument("--only", type=int, nargs="*", help="indices of the sweep rows to run")
    parser.add_argument("--timeline", type=int, nargs="*", default=[], help="rows that also get an op timeline")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which rows are skipped")
    parser.add_argument("--no-estimate", action="store_true", help="leave the estimate column empty (fast)")
    parser.add_argument("--rewrite", help="only rewrite the .md table of this JSON (e.g. after an estimator change)")
    args = parser.parse_args(argv)
    if args.rewrite:
        doc = json.loads(Path(args.rewrite).read_text())
        print(write_tables(doc["rows"], Path(args.rewrite).parent, doc["gpu"], doc["device"], doc=doc))
        return
    name = gpu_name()
    device = {"name": name}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        device.update(total_memory=props.total_memory, capability=f"{props.major}.{props.minor}",
                      context_bytes=total - free - torch.cuda.memory_reserved())
    print(f"device: {device}", flush=True)
    rows = run(args)
    path = write_tables(rows, Path(args.out), name, device, estimate=not args.no_estimate)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
