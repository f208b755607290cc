"""Data-parallel adapter training on a 4-bit base with 2 CPU processes (gloo), through accelerate: the processes
end with identical adapter weights, and the result matches a single process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_distributed.py"
ARGS = ["--steps", "4", "--global-batch", "8", "--lr", "1e-3"]
# fp32 sums of the same gradients in another order (per-process partial sums, then all-reduce): after 4 Adam
# steps the weights agree to ~1e-7 relative; 1e-5 leaves room for other CPUs' kernels, far below a real difference
# (one step of lr 1e-3 moves a weight by ~1e-3).
RELATIVE_TOLERANCE = 1e-5


def _run(command, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run(command + ["--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), torch.load(out / "adapter_vector.pt")


def test_two_processes_match_one(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    two, two_weights = _run([str(accelerate), "launch", "--config_file", "configs/accelerate/ddp.yaml",
                             "--num_processes", "2", str(SCRIPT), *ARGS], tmp_path / "two")
    one, one_weights = _run([sys.executable, str(SCRIPT), *ARGS], tmp_path / "one")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["max_weight_difference_between_processes"] == 0.0  # the ranks hold the same adapter
    assert two["tokens"] == one["tokens"]  # same samples per step in total
    relative = float((two_weights - one_weights).norm() / one_weights.norm())
    assert relative < RELATIVE_TOLERANCE, relative
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-3)
    assert (tmp_path / "two" / "adapter" / "adapter_config.json").exists()  # saved once, by rank 0


def test_refuses_to_write_into_a_used_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("someone's work")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "already holds files; nothing was changed" in done.stderr
    assert (tmp_path / "keep.txt").read_text() == "someone's work"


def test_fsdp_misuse_is_refused_before_loading_anything(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, as in CI
    done = subprocess.run([sys.executable, str(SCRIPT), "--fsdp", "--out", str(tmp_path / "a")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "needs CUDA GPUs" in done.stderr and "ddp.yaml" in done.stderr
    env["ACCELERATE_USE_FSDP"] = "true"  # what accelerate launch sets for configs/accelerate/fsdp_qlora.yaml
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "b")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Add --fsdp" in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
