"""The table of `benchmarks/multi_gpu.sh N` (issue #17): DDP on 1 and N GPUs (weak scaling: the same rows per GPU)
and FSDP-QLoRA's peak per GPU against `qadapter_utils.memory.estimate_training_memory(..., shards=N)`.

    python benchmarks/multi_gpu_table.py benchmarks/results/multi_gpu        # reads ddp1.json, ddpN.json, fsdpN.json

Reads the result.json files scripts/train_distributed.py wrote (multi_gpu.sh copies them to <dir>/<run>.json) and
writes <dir>/table.md; a run that is missing or wrote no result is a row that says so. Weak-scaling efficiency =
steady tokens/s on N GPUs / (N x steady tokens/s on 1 GPU), both from the same multi_gpu.sh call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _runs(folder: Path) -> tuple[dict | None, dict | None, dict | None]:
    """(ddp1, ddpN, fsdpN) with the largest N found."""
    ns = sorted(int(p.stem[3:]) for p in folder.glob("ddp*.json") if p.stem[3:].isdigit() and p.stem != "ddp1")
    n = ns[-1] if ns else None
    ddp_n = _load(folder / f"ddp{n}.json") if n else None
    fsdp_n = _load(folder / f"fsdp{n}.json") if n else None
    return _load(folder / "ddp1.json"), ddp_n, fsdp_n


def fsdp_estimate(result: dict) -> float:
    """estimate_training_memory for an FSDP run of train_distributed.py: its shape, per-GPU batch and length, the
    recipe make_trainer runs on CUDA, shards = the world size (GiB)."""
    from qadapter_utils import memory

    shape = result["model"].split(":", 1)[-1]
    per_gpu = result["global_batch"] // result["world_size"]
    return memory.estimate_training_memory(shape, bits=result["bits"], adapter=result["method"], batch_size=per_gpu,
                                           seq_len=result["synthetic_length"], shards=result["world_size"]).total / GIB


def markdown(ddp1: dict | None, ddp_n: dict | None, fsdp_n: dict | None) -> str:
    lines = ["| run | processes | global batch | steady tokens/s | per GPU | weak-scaling efficiency | "
             "peak allocated per GPU | estimate per GPU | adapters identical across ranks |",
             "|---|---|---|---|---|---|---|---|---|"]

    def peaks(r):
        values = [p for p in r["peak_allocated_gib_per_process"] if p is not None]
        return f"{min(values):.2f}-{max(values):.2f} GiB" if values and min(values) != max(values) else \
            (f"{values[0]:.2f} GiB" if values else "")

    for label, r in (("DDP, 1 GPU (reference)", ddp1), ("DDP", ddp_n), ("FSDP-QLoRA", fsdp_n)):
        if r is None:
            lines.append(f"| {label} | | | not run or no result | | | | | |")
            continue
        per_gpu = r["steady_tokens_per_second"] / r["world_size"]
        efficiency = ""
        if label == "DDP" and ddp1 is not None:
            ideal = r["world_size"] * ddp1["steady_tokens_per_second"]
            efficiency = f"{100 * r['steady_tokens_per_second'] / ideal:.0f} %"
        estimate = ""
        if r.get("fsdp") and r.get("synthetic_length"):
            estimate = f"{fsdp_estimate(r):.2f} GiB"
        same = "" if r.get("fsdp") or r["world_size"] == 1 else \
            ("yes" if r["max_weight_difference_between_processes"] == 0.0 else
             f"no (max difference {r['max_weight_difference_between_processes']:.2e})")
        lines.append(f"| {label}, {r['model']} | {r['world_size']} | {r['global_batch']} x "
                     f"{r.get('synthetic_length') or 'task rows'} | {r['steady_tokens_per_second']:,.0f} | "
                     f"{per_gpu:,.0f} | {efficiency} | {peaks(r)} | {estimate} | {same} |")
    device = next((r["device"] for r in (ddp1, ddp_n, fsdp_n) if r), "?")
    return f"Measured on {device} (`benchmarks/multi_gpu.sh`).\n\n" + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    text = markdown(*_runs(args.folder))
    (args.folder / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
