"""How long a 4-bit load of a Llama-2-7B-shaped checkpoint takes, with transformers' quantizer as it is and with
`models.quantize_4bit_where_read` (which `load_model` uses), and whether the two give the same bytes.

    python benchmarks/load_4bit.py --out benchmarks/results        # a CUDA GPU, about a minute
    python benchmarks/load_4bit.py --model tiny --out /tmp/load    # the same code path on the CPU (seconds)

transformers 4.57 reads each weight onto the GPU, then its bitsandbytes 4-bit quantizer copies it back to the CPU
and bitsandbytes copies it up again to quantize it. Both loads below go through `from_pretrained` with the same
`BitsAndBytesConfig` (NF4, double quantization, fp16 compute) from the same checkpoint (already in the page cache:
built and read once before timing); the only difference is that context manager. Then every packed weight and
every quantization-state tensor of the two models is compared. Writes <out>/load_4bit_<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qadapter_utils import models  # noqa: E402


def _load(path, config, device_map, where_read: bool):
    from transformers import AutoModelForCausalLM

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    with models.quantize_4bit_where_read() if where_read else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float16,
                                                     device_map=device_map)
    sync()
    return model, time.perf_counter() - start


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every packed 4-bit weight and every tensor of its quantization state, by name."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            out[f"{name}.weight"] = module.weight.data
            out[f"{name}.absmax"] = state.absmax
            out[f"{name}.code"] = state.code
            if state.nested:
                out[f"{name}.offset"] = state.offset
                out[f"{name}.absmax2"] = state.state2.absmax
                out[f"{name}.code2"] = state.state2.code
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:llama2-7b")
    parser.add_argument("--repeats", type=int, default=2, help="timed loads of each kind, alternating")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    path = models._resolve(args.model, torch.float16)  # builds a random checkpoint once
    config = models.bnb_config(4, "nf4", True, torch.float16)
    gpu = torch.cuda.is_available()
    device_map = {"": 0} if gpu else {"": "cpu"}
    _load(path, config, device_map, True)  # one untimed read: the checkpoint is in the page cache after it
    gc.collect()
    times = {"transformers as is": [], "quantize_4bit_where_read": []}
    kept = {}
    for _ in range(args.repeats):
        for label, where_read in (("transformers as is", False), ("quantize_4bit_where_read", True)):
            kept.pop(label, None)
            gc.collect()
            torch.cuda.empty_cache() if gpu else None
            model, seconds = _load(path, config, device_map, where_read)
            times[label].append(round(seconds, 2))
            kept[label] = model
    a, b = (_tensors(kept[label]) for label in times)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    import bitsandbytes
    import transformers

    result = {"model": args.model, "device": device, "seconds": times, "tensors compared": len(a),
              "identical": same, "stack": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                                          f"bitsandbytes {bitsandbytes.__version__}"}
    tag = device.split()[-1].lower() if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load_4bit_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    best = {label: min(s) for label, s in times.items()}
    lines = [f"# 4-bit load of `{args.model}` on {device}", "",
             f"{result['stack']}. NF4 + double quantization, fp16 compute, checkpoint in the page cache; "
             f"`python benchmarks/load_4bit.py`.", "",
             "| loader | seconds (each load) | best |", "|---|---|---|"]
    lines += [f"| {label} | {', '.join(map(str, s))} | {best[label]:.2f} |" for label, s in times.items()]
    lines += ["", f"Packed weights and quantization states identical: **{same}** ({len(a)} tensors compared)."]
    (args.out / f"load_4bit_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
