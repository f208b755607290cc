"""benchmarks/recipe_vs_peft.py and t4_check.py --model tiny --quick run on the CPU (every code path, tiny
numbers): only where peft is importable (it is not a dependency of the package). benchmarks/quant_bytes.py runs on
the CPU everywhere."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (benchmark baseline)")
def test_recipe_vs_peft_quick_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_vs_peft.py"), "--model", "tiny",
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "recipe_vs_peft_cpu.md").read_text()
    for recipe in ("(a) stock PEFT", "(b) PEFT + DataCollatorWithFlattening + SDPA", "ours: make_trainer"):
        assert recipe in md
    assert "## Comparisons" in md and "## Errors" not in md


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (benchmark baseline)")
def test_t4_check_quick_runs(tmp_path):
    """benchmarks/t4_check.py --model tiny --quick: stock PEFT in the own loop, ours and the plain adapters recipe
    through make_trainer in every configuration (about 20 s on two CPU cores)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "t4_check.py"), "--model", "tiny", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "t4_check_cpu.md").read_text()
    assert "make_trainer: packed attention + chunked loss + tiled MLP + offloaded checkpoints" in md
    assert "Longest that trains: stock PEFT: 128, adapters, plain loss: 128, ours: 384" in md
    assert "full configuration vs plain recipe" in md and "## Errors" not in md


def test_quant_bytes_on_the_cpu_finds_the_cpu_kernel_identical(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quant_bytes.py"), "--device", "cpu",
                           "--scale", "0.02", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "quant_bytes_cpu.json").read_text())["rows"]
    assert len(rows) == 16 and all(r["identical bytes"] for r in rows if r["kernel"] == "cpu")
    # the CUDA kernel's search parts from bitsandbytes' CPU table only in the double-quantized scales
    cuda = [r for r in rows if r["kernel"] == "cuda"]
    assert all(r["codes equal"] for r in cuda)
    assert all(r["identical bytes"] != r["double_quant"] for r in cuda)
    assert (tmp_path / "quant_bytes_cpu.md").exists()
