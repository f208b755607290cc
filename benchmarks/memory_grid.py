"""Peak GPU memory of adapter training as users run it, through `qadapter_utils.train.make_trainer` itself and
through a plain `adapters.AdapterTrainer` (bf16/fp16=True, padded batches, the model's own loss), beside the
estimate of `qadapter_utils.memory.estimate_training_memory` for the same recipe (issue #14).

    python benchmarks/memory_grid.py --out benchmarks/results             # the tuning grid on a CUDA GPU
    python benchmarks/memory_grid.py --grid check --out benchmarks/results  # configurations not tuned on
    python benchmarks/memory_grid.py --quick --out /tmp/grid               # a smoke test on the CPU (tiny model)
    python benchmarks/memory_grid.py --rewrite benchmarks/results/memory_grid_h200.json  # redo the estimates

Each row: the base loaded once per (shape, bits, compute dtype) from a random-weight checkpoint of the real shape
(models.random_checkpoint: values change neither memory nor speed); the adapter added as the notebooks add it
(methods.add_adapter: fp32 adapter weights); `--steps` optimizer steps on rows of exactly seq_len random tokens,
batch_size rows per batch (make_trainer packs them into one row; the plain Trainer pads nothing since all rows
have the same length); peak = torch.cuda.max_memory_allocated() from just before `trainer.train()` to its end
(model included, CUDA context not). Rows of the "t4" group run in fp16 under a T4's memory
(torch.cuda.set_per_process_memory_fraction at 14.15 GiB, as benchmarks/t4_check.py). Rows in --timeline also
get an op-by-op memory record of their last step (timelines_<grid>.json: op, in backward or not, bytes
allocated after it, peak during it).

Writes <out>/memory_grid_<gpu>.json (rows + machine + versions; a second grid adds its rows to the same file)
and .md (each row with the estimate and its error), and one JSON line per row to <out>/grid_rows.jsonl as it
goes. tests/test_memory.py re-checks every committed row against the estimator.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from memory_sweep import Timeline, gpu_name, gpu_slug, versions  # noqa: E402

from qadapter_utils import memory, methods, models  # noqa: E402
from qadapter_utils.fast import set_attention, untile_mlp  # noqa: E402

GIB = 2**30
T4_CAP_GIB = 14.15  # a T4's 14.75 GiB less 0.6 GiB of CUDA context (benchmarks/t4_check.py, scripts/run_notebooks.py)


def row(shape, bits, adapter, b, s, *, recipe="make_trainer", gc_on=True, dtype="bfloat16", optimizer=None,
        overrides=None, switches=None, group=None) -> dict:
    return dict(shape=shape, bits=bits, adapter=adapter, batch_size=b, seq_len=s, recipe=recipe,
                gradient_checkpointing=gc_on, compute_dtype=dtype, optimizer=optimizer, overrides=overrides or {},
                switches=switches or {}, group=group or ("t4" if dtype == "float16" else "main"))


R64 = {"r": 64, "alpha": 128}
OFFLOAD = {"tiled_mlp": 4096, "offload_checkpoints": True}
GRIDS = {
    # the configurations the estimator's make_trainer and plain recipes were tuned on (first GPU call)
    "tune": [
        row("llama2-7b", 4, "lora", 1, 2048),
        row("llama2-7b", 4, "lora", 4, 512),
        row("llama2-7b", 4, "lora", 1, 8192),
        row("llama2-7b", 4, "lora", 4, 4096),
        row("llama2-7b", 4, "lora_all", 1, 4096, overrides=R64),
        row("llama2-7b", 4, "lora_all", 2, 2048, overrides=R64, gc_on=False),
        row("llama2-7b", 4, "lora_all", 1, 2048),
        row("llama2-7b", 4, "seq_bn", 2, 1024),
        row("llama2-7b", 4, "par_bn", 1, 4096),
        row("llama2-7b", 4, "prefix", 2, 1024),
        row("llama2-7b", 4, "ia3", 1, 2048),
        row("llama2-7b", 4, "lora", 1, 2048, gc_on=False),
        row("llama2-7b", 4, "lora", 4, 1024, gc_on=False),
        row("llama2-7b", 4, "lora", 1, 4096, optimizer="adamw_torch"),
        row("llama2-7b", 4, "lora", 4, 512, recipe="plain"),
        row("llama2-7b", 4, "lora", 1, 2048, recipe="plain", gc_on=False),
        row("llama2-7b", 4, "lora_all", 4, 2048, recipe="plain", overrides=R64, gc_on=False),
        row("llama2-7b", 4, "lora_all", 2, 1024, recipe="plain", overrides=R64),
        row("llama2-7b", 4, "seq_bn", 2, 1024, recipe="plain"),
        row("llama2-7b", 4, "prefix", 2, 2048, recipe="plain"),
        row("llama2-7b", 8, "lora", 4, 512),
        row("llama2-7b", 8, "lora", 1, 2048),
        row("llama2-7b", 8, "lora", 2, 512, gc_on=False),
        row("llama2-7b", 8, "lora_all", 1, 1024, overrides=R64),
        row("llama2-7b", 8, "lora", 4, 512, recipe="plain"),
        row("llama2-7b", 8, "lora", 1, 1024, recipe="plain", gc_on=False),
        row("llama2-7b", 4, "lora", 1, 4096, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 16384, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 20480, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 32768, dtype="float16", switches=OFFLOAD),
    ],
    # configurations the estimator was not tuned on (second GPU call), filled after the first
    "check": [
        row("mistral-7b", 4, "lora", 2, 2048),
        row("mistral-7b", 4, "lora_all", 1, 1024, overrides={"r": 32, "alpha": 64}, gc_on=False),
        row("mistral-7b", 4, "lora", 2, 1024, recipe="plain"),
        row("mistral-7b", 4, "seq_bn", 1, 8192),
        row("llama2-7b", 4, "lora", 1, 6144, overrides={"r": 128, "alpha": 256, "attn_matrices": ["q", "k", "v"]}),
        row("llama2-7b", 4, "lora", 2, 2048, overrides={"dropout": 0.1}),
        row("llama2-7b", 4, "par_bn", 4, 1024, gc_on=False),
        row("llama2-7b", 4, "seq_bn", 1, 8192),
        row("llama2-7b", 4, "prefix", 1, 4096),
        row("llama2-7b", 4, "ia3", 8, 1024, gc_on=False),
        row("llama2-7b", 4, "lora", 1, 12288, optimizer="adamw_torch_fused"),
        row("llama2-7b", 4, "lora_all", 1, 4096, recipe="plain", overrides=R64),
        row("llama2-7b", 4, "prefix", 1, 1024, recipe="plain", gc_on=False),
        row("llama2-7b", 4, "par_bn", 2, 2048, recipe="plain"),
        row("llama2-7b", 8, "seq_bn", 2, 1024),
        row("llama2-7b", 8, "lora", 1, 4096),
        row("llama2-7b", 8, "lora_all", 2, 512, overrides=R64, gc_on=False),
        row("llama2-7b", 8, "lora_all", 2, 1024, recipe="plain"),
        row("llama2-7b", 4, "lora_all", 1, 8192, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 17408, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 18432, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 19456, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 12288, recipe="plain", dtype="float16", optimizer="paged_adamw_8bit"),
        row("llama2-7b", 4, "lora", 1, 14336, recipe="plain", dtype="float16", optimizer="paged_adamw_8bit"),
        row("llama2-7b", 4, "lora", 1, 53248, dtype="float16", switches=OFFLOAD),
    ],
    # third GPU call: the planner's T4 answers (memory.max_seq_len("T4", compute_dtype="float16", ...) with the
    # recipe of the row) trained under the T4 cap, and eager-attention rows after the softmax-backward fix
    "verify": [
        row("llama2-7b", 4, "lora", 1, 16896, dtype="float16"),
        row("llama2-7b", 4, "lora_all", 1, 15872, dtype="float16"),
        row("llama2-7b", 4, "lora", 1, 46848, dtype="float16", switches=OFFLOAD),
        row("llama2-7b", 4, "prefix", 2, 2048),
        row("llama2-7b", 4, "prefix", 1, 3072, recipe="plain"),
        row("llama2-7b", 4, "prefix", 1, 1536, gc_on=False),
        row("llama2-7b", 8, "prefix", 1, 2048),
    ],
}
QUICK = [
    row("tiny", 4, "lora", 2, 64),
    row("tiny", 4, "lora_all", 1, 128, overrides={"r": 8, "alpha": 16}, gc_on=False),
    row("tiny", 4, "prefix", 1, 64),
    row("tiny", 4, "lora", 2, 64, recipe="plain"),
    row("tiny", 8, "lora", 1, 64),
    row("tiny", 4, "lora", 1, 256, switches={"tiled_mlp": 64, "offload_checkpoints": True}),
]


def row_key(r: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in {**r["overrides"], **r["switches"]}.items())
    return (f"{r['recipe']} {r['shape']} {r['bits']}bit {r['compute_dtype']} {r['adapter']}"
            f"{'(' + extra + ')' if extra else ''} gc={'on' if r['gradient_checkpointing'] else 'off'} "
            f"b={r['batch_size']} s={r['seq_len']}{' ' + r['optimizer'] if r['optimizer'] else ''}")


def load(shape: str, bits: int, dtype: torch.dtype):
    """(model, tokenizer): the random-weight checkpoint of `shape` in `bits` with compute dtype `dtype`, loaded as the
    notebooks load it (random shapes come with the tiny tokenizer: the collators need only its pad id)."""
    return models.load_model(f"random:{shape}", bits=bits, compute_dtype=dtype)


def random_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    ids[:, 0] = 1
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def _trainer(model, tokenizer, spec: dict, rows: list, folder: str, steps: int):
    """The trainer of `spec`'s recipe: make_trainer, or a plain AdapterTrainer as users write it."""
    from adapters import AdapterTrainer
    from transformers import TrainingArguments

    from qadapter_utils.data import make_collator
    from qadapter_utils.train import _precision_of_this_trainer, make_trainer

    common = dict(max_steps=steps, per_device_train_batch_size=spec["batch_size"], save_strategy="no",
                  logging_steps=1, disable_tqdm=True, output_dir=folder, report_to="none")
    if spec["optimizer"]:
        common["optim"] = spec["optimizer"]
    if spec["recipe"] == "make_trainer":
        return make_trainer(model, tokenizer, rows, packing=True, max_length=None,
                            gradient_checkpointing=spec["gradient_checkpointing"], **spec["switches"], **common)
    cuda = torch.cuda.is_available()
    dtype = methods.compute_dtype(model)
    args = dict(common, bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16,
                use_cpu=not cuda, remove_unused_columns=False,
                gradient_checkpointing=spec["gradient_checkpointing"],
                gradient_checkpointing_kwargs={"use_reentrant": False})
    _precision_of_this_trainer(args)
    return AdapterTrainer(model=model, args=TrainingArguments(**args), train_dataset=rows,
                          data_collator=make_collator(tokenizer, packing=False))


def measure(model, tokenizer, spec: dict, steps: int, timeline: bool) -> dict:
    """Train `steps` steps of `spec` on `model` (the adapter added and removed here); the row's record."""
    name = "grid"
    record = {}
    methods.remove_input_require_grads_hooks(model)  # each row starts as in a fresh process
    set_attention(model, "sdpa")
    untile_mlp(model)
    cuda = torch.cuda.is_available()
    try:
        methods.add_adapter(model, spec["adapter"], name, gradient_checkpointing=spec["gradient_checkpointing"],
                            **spec["overrides"])
        record["adapter_config"] = model.adapters_config.get(name).to_dict()
        record["attn_implementation"] = model.config._attn_implementation
        rows = random_rows(steps * spec["batch_size"], spec["seq_len"], model.config.vocab_size)
        with tempfile.TemporaryDirectory(prefix="grid-") as folder:
            trainer = _trainer(model, tokenizer, spec, rows, folder, steps)
            record["optimizer"] = trainer.args.optim.value if hasattr(trainer.args.optim, "value") \
                else str(trainer.args.optim)
            record["bf16"], record["fp16"] = trainer.args.bf16, trainer.args.fp16
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            record["allocated_before"] = torch.cuda.memory_allocated() if cuda else 0
            tl = Timeline(0) if timeline and cuda else None  # labelled by optimizer step
            t = time.time()
            if tl is not None:
                from transformers import TrainerCallback

                class Step(TrainerCallback):
                    def on_step_begin(self, args, state, control, **kwargs):
                        tl.label[0] = state.global_step

                trainer.add_callback(Step())
                with tl.mode:
                    trainer.train()
                record["timeline"] = tl.moved(max(r[0] for r in tl.rows))  # the last step
                record["peak_allocated"] = max(r[4] for r in tl.rows)
            else:
                trainer.train()
                stats = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "StepStats"]
                record["peak_allocated"] = torch.cuda.max_memory_allocated() if cuda else \
                    (stats[0].peak_bytes if stats else None)  # on the CPU: make_trainer's own measure
            record["peak_reserved"] = torch.cuda.max_memory_reserved() if cuda and tl is None else None
            record["seconds"] = round(time.time() - t, 2)
            record["trained_attention"] = model.config._attn_implementation
            record["loss"] = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
            trainer = None
    except torch.cuda.OutOfMemoryError as err:
        record["error"] = f"OutOfMemoryError: {str(err)[:600]}"
        record["peak_allocated_before_error"] = torch.cuda.max_memory_allocated()
        record["peak_reserved_before_error"] = torch.cuda.max_memory_reserved()
    except Exception as err:  # noqa: BLE001  (keep the grid going; the row records what failed)
        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        set_attention(model, "sdpa")
        untile_mlp(model)
        if name in getattr(model, "adapters_config", {}):
            model.delete_adapter(name)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return record


def run(args) -> list[dict]:
    specs = QUICK if args.quick else GRIDS[args.grid]
    indices = args.only if args.only else range(len(specs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    records = []
    jsonl = open(out / "grid_rows.jsonl", "a")
    order = sorted(indices, key=lambda i: (specs[i]["group"] == "t4", specs[i]["shape"], specs[i]["bits"],
                                           specs[i]["compute_dtype"]))
    loaded_key, model, tokenizer = None, None, None
    cuda = torch.cuda.is_available()
    for i in order:
        spec = specs[i]
        if time.time() - t0 > args.deadline:
            print(f"deadline: row {i} not run", flush=True)
            continue
        key = (spec["shape"], spec["bits"], spec["compute_dtype"])
        if key != loaded_key:
            model = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            t = time.time()
            dtype = getattr(torch, spec["compute_dtype"]) if cuda else torch.float32
            model, tokenizer = load(spec["shape"], spec["bits"], dtype)
            loaded_key = key
            print(f"loaded {key} in {time.time() - t:.1f}s", flush=True)
        if cuda:
            cap = T4_CAP_GIB * GIB / torch.cuda.get_device_properties(0).total_memory if spec["group"] == "t4" else 1.0
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap))
        record = dict(index=i, grid="quick" if args.quick else args.grid, key=row_key(spec), model=spec["shape"],
                      **{k: spec[k] for k in ("bits", "adapter", "batch_size", "seq_len", "recipe",
                                              "gradient_checkpointing", "compute_dtype", "overrides", "group")},
                      **spec["switches"], double_quant=True, quant_type="nf4", steps=args.steps)
        record["cap_gib"] = T4_CAP_GIB if spec["group"] == "t4" else None
        record.update(measure(model, tokenizer, spec, args.steps, i in args.timeline))
        records.append(record)
        jsonl.write(json.dumps({k: v for k, v in record.items() if k != "timeline"}) + "\n")
        jsonl.flush()
        peak = record.get("peak_allocated")
        print(f"[{i:2d}] {record['key']:<80} " + (f"peak {peak / GIB:7.3f} GiB ({record['seconds']:.1f}s)"
                                                  if peak else record.get("error", "")), flush=True)
    return records


def markdown(doc: dict) -> str:
    lines = [f"# Peak training memory through make_trainer and a plain Trainer, measured on {doc['gpu']}", "",
             "`torch.cuda.max_memory_allocated()` over the training steps (model included, CUDA context not), "
             "random weights of the named shape, 4-bit NF4 + double quantization or 8-bit LLM.int8(), adapters added "
             "with `qadapter_utils.methods.add_adapter` (fp32 weights). make_trainer: its CUDA defaults (autocast, "
             "packed batches and attention, chunked loss, paged AdamW 8-bit) unless the row says otherwise; plain: "
             "`adapters.AdapterTrainer` with bf16/fp16=True, padded batches, the model's own loss. t4: fp16 under "
             f"a {T4_CAP_GIB} GiB cap. Estimate: `qadapter_utils.memory.estimate_for_row` (the row's recipe). "
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".", "",
             *([doc["notes"], ""] if doc.get("notes") else []),
             "| grid | # | recipe | base | adapter | ckpt | batch x seq | optimizer | measured GiB | estimated GiB | "
             "error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        adapter = r["adapter"] + ("(" + ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) + ")"
                                  if r["overrides"] else "")
        extra = [k for k in ("tiled_mlp", "offload_checkpoints") if r.get(k)]
        recipe = r["recipe"] + (" + " + " + ".join(extra) if extra else "")
        base = f"{r['model']} {r['bits']}-bit {r['compute_dtype']}" + (" (T4 cap)" if r.get("group") == "t4" else "")
        head = (f"| {r['grid']} | {r['index']} | {recipe} | {base} | {adapter} | "
                f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['batch_size']} x {r['seq_len']} | "
                f"{r.get('optimizer', '')} | ")
        if not r.get("peak_allocated"):
            lines.append(head + f"{r.get('error', 'not measured')[:60]} | | |")
            continue
        est = r.get("estimate")
        err = (est - r["peak_allocated"]) / r["peak_allocated"] if est else float("nan")
        lines.append(head + f"{r['peak_allocated'] / GIB:.3f} | {est / GIB if est else float('nan'):.3f} | "
                            f"{100 * err:+.1f}% |")
    return "\n".join(lines) + "\n"


def add_estimates(rows: list[dict]) -> None:
    for r in rows:
        if not r.get("peak_allocated"):
            continue
        try:
            r["estimate"] = memory.estimate_for_row(r)
        except Exception as exc:  # noqa: BLE001  (an estimator problem must not lose the measurements)
            print(f"estimate failed for row {r['index']}: {type(exc).__name__}: {exc}")
            r["estimate"] = None


def write(out: Path, rows: list[dict], device: dict, timelines: dict) -> Path:
    path = out / f"memory_grid_{gpu_slug(device['name'])}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"gpu": device["name"], "device": device,
                                                              "versions": versions(), "rows": []}
    grids = {r["grid"] for r in rows}
    doc["rows"] = [r for r in doc["rows"] if r["grid"] not in grids] + rows
    add_estimates(doc["rows"])
    path.write_text(json.dumps(doc, indent=1))
    path.with_suffix(".md").write_text(markdown(doc))
    if timelines:
        (out / f"timelines_{'_'.join(sorted(grids))}.json").write_text(json.dumps(timelines))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    ap.add_argument("--grid", default="tune", choices=sorted(GRIDS))
    ap.add_argument("--quick", action="store_true", help="the CPU smoke test on the tiny shape")
    ap.add_argument("--only", type=int, nargs="*", help="indices of the grid's rows to run")
    ap.add_argument("--timeline", type=int, nargs="*", default=[], help="rows that also get an op timeline")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which rows are skipped")
    ap.add_argument("--rewrite", help="only recompute the estimates and the .md of this JSON")
    args = ap.parse_args(argv)
    if args.rewrite:
        path = Path(args.rewrite)
        doc = json.loads(path.read_text())
        add_estimates(doc["rows"])
        path.write_text(json.dumps(doc, indent=1))
        path.with_suffix(".md").write_text(markdown(doc))
        print(path.with_suffix(".md").read_text())
        return
    device = {"name": gpu_name()}
    if torch.cuda.is_available():
        device["total_memory"] = torch.cuda.get_device_properties(0).total_memory
    records = run(args)
    timelines = {r["index"]: r.pop("timeline") for r in records if "timeline" in r}
    path = write(Path(args.out), records, device, timelines)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
