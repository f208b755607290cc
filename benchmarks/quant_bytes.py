"""Does `quant.quantize_4bit` give the bytes bitsandbytes gives on this device? On the CPU it must (kernel="cpu",
also tests/test_quant.py); on a CUDA GPU bitsandbytes quantizes with its CUDA kernel, which rounds some
double-quantized block scales to the other neighbouring 8-bit code, and kernel="cuda" follows its search
(notebooks/01_quantization_theory.ipynb, section 7). This compares both kernels of ours with bitsandbytes itself.

    python benchmarks/quant_bytes.py --out benchmarks/results        # a CUDA GPU: seconds
    python benchmarks/quant_bytes.py --device cpu --out /tmp/qb      # the same code path on the CPU

For each case (Llama-2-7B's projection shapes, random normal weights of std 0.02 in fp16, NF4 and FP4, with and
without double quantization): whether the packed codes, the absmax (8-bit codes with double quantization), the
offset and the second-level absmax are equal, how many scale codes differ, and the largest difference after
dequantization. Writes <out>/quant_bytes_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qadapter_utils import quant as Q  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "down_proj": (4096, 11008)}


def compare(w: torch.Tensor, quant_type: str, double_quant: bool, kernel: str) -> dict:
    """Ours (kernel) against bitsandbytes.functional.quantize_4bit of `w` on w's device."""
    import bitsandbytes.functional as F

    packed_b, state_b = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    packed, state = Q.quantize_4bit(w.cpu(), 64, quant_type, double_quant=double_quant, kernel=kernel)
    codes = torch.equal(packed, packed_b.cpu())
    scales_b = state_b.absmax.cpu()
    row = {"kernel": kernel, "codes equal": codes, "scale codes differing": int((state.absmax != scales_b).sum()),
           "scales": state.absmax.numel()}
    if double_quant:
        row["offset equal"] = bool(torch.equal(state.offset.reshape(()), state_b.offset.cpu().reshape(())))
        row["second-level absmax equal"] = torch.equal(state.nested_absmax, state_b.state2.absmax.cpu())
    ours = Q.dequantize_4bit(packed, state).float()
    theirs = F.dequantize_4bit(packed_b, state_b).float().cpu()
    row["max |ours - bitsandbytes| dequantized"] = float((ours - theirs).abs().max())
    row["identical bytes"] = codes and row["scale codes differing"] == 0 and row.get("offset equal", True) \
        and row.get("second-level absmax equal", True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each shape's rows (CPU smoke runs)")
    args = parser.parse_args(argv)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        rows_n = max(1, int(out_features * args.scale))
        w = (torch.randn(rows_n, in_features, generator=torch.Generator().manual_seed(0)) * 0.02).half()
        w = w.to(args.device)
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                for kernel in ("cpu", "cuda"):
                    rows.append({"layer": name, "shape": [rows_n, in_features], "quant_type": quant_type,
                                 "double_quant": double_quant, **compare(w, quant_type, double_quant, kernel)})
    import bitsandbytes

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    meta = {"device": device, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__}
    tag = "cpu" if device == "CPU" else device.split()[-1].lower()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quant_bytes_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    columns = ["layer", "quant_type", "double_quant", "kernel", "identical bytes", "codes equal",
               "scale codes differing", "max |ours - bitsandbytes| dequantized"]
    lines = [f"# quant.quantize_4bit against bitsandbytes on {device}", "",
             f"torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}; `python benchmarks/quant_bytes.py`; "
             f"random normal fp16 weights (std 0.02), blocksize 64.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2g}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    (args.out / f"quant_bytes_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
