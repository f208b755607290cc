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


def _free_port() -> int:
    """A port no one listens on: notebook 08 launches on accelerate's default (29500), possibly at the same time
    on the other pytest worker."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    two, two_weights = _run([str(accelerate), "launch", "--config_file", "configs/accelerate/ddp.yaml",
                             "--main_process_port", str(_free_port()), "--num_processes", "2", str(SCRIPT), *ARGS],
                            tmp_path / "two")
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


FSDP_CHECK = r'''
import json, os, sys, torch, torch.distributed as dist, warnings
warnings.simplefilter("ignore")

def run(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    import qadapter_utils as qu
    from qadapter_utils import memory
    from qadapter_utils.loss import causal_lm_loss
    from qadapter_utils.train import fsdp_wrap_policy
    torch.manual_seed(0)
    # FSDP-QLoRA as scripts/train_distributed.py --fsdp loads it: 4-bit weights stored in bf16, fp32 adapters
    model, _ = qu.load_model("tiny", bits=4, compute_dtype="bfloat16", quant_storage="bfloat16")
    qu.add_adapter(model, "lora")
    batch = memory.random_batch(model, 2, 32)
    layers_only = lambda module, recurse, nonwrapped_numel: recurse or type(module) is type(model.model.layers[0])
    result = {}
    try:
        FSDP(model, auto_wrap_policy=layers_only, use_orig_params=True, device_id=torch.device("cpu"))
    except ValueError as err:
        result["layers_only"] = str(err)
    fsdp = FSDP(model, auto_wrap_policy=fsdp_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                use_orig_params=True, device_id=torch.device("cpu"))
    fsdp.train()
    losses, grads = [], []
    for compute in (lambda: fsdp(**batch).loss, lambda: causal_lm_loss(fsdp, chunk_size=16, **batch)):
        fsdp.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.float() for n, p in fsdp.named_parameters() if p.grad is not None})
    result.update(losses=losses, grad_tensors=len(grads[0]), shard_numel=sum(g.numel() for g in grads[0].values()),
                  grad_difference=max(float((grads[1][n] - grads[0][n]).abs().max()) for n in grads[0]))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(run, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


def test_fsdp_wraps_fp32_adapters_and_the_chunked_loss_runs_sharded(tmp_path):
    """FULL_SHARD over 2 CPU processes (gloo), what `make_trainer` does under an FSDP launch: with the decoder layers
    as the only units FSDP refuses fp32 adapters beside 4-bit weights stored in bf16; train.fsdp_wrap_policy wraps
    them, and the chunked
    loss (computed inside the model's forward, where FSDP has gathered the sharded lm_head) equals the model's own
    loss with the same sharded gradients."""
    port = _free_port()
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_CHECK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert "uniform dtype" in result["layers_only"]
        plain, chunked = result["losses"]
        assert abs(plain - chunked) <= 1e-5 * abs(plain), result["losses"]
        assert result["grad_tensors"] == 8 and result["grad_difference"] <= 1e-6  # 4 layers x (q, v) x (A, B)
    assert sum(r["shard_numel"] for r in ranks) == 4 * 2 * 16 * (128 + 128)  # sharded: the ranks split the LoRA


def test_multi_gpu_table(tmp_path):
    """benchmarks/multi_gpu_table.py on results shaped like train_distributed.py's: weak-scaling efficiency from the
    1- and 2-GPU DDP runs, FSDP's peak per GPU beside the estimator's for the same shape and per-GPU batch."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import multi_gpu_table

    from qadapter_utils import memory

    def result(world, fsdp, tokens_per_s, peaks, model="random:llama2-7b", batch=8):
        return dict(model=model, bits=4, method="lora", world_size=world, fsdp=fsdp, global_batch=batch * world,
                    synthetic_length=512, steady_tokens_per_second=tokens_per_s, device="NVIDIA H200",
                    peak_allocated_gib_per_process=peaks, max_weight_difference_between_processes=0.0)

    (tmp_path / "ddp1.json").write_text(json.dumps(result(1, False, 8000.0, [6.1])))
    (tmp_path / "ddp2.json").write_text(json.dumps(result(2, False, 14400.0, [6.3, 6.3])))
    multi_gpu_table.main([str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert "| 90 % |" in table and "FSDP-QLoRA | | | not run or no result" in table and "| yes |" in table
    (tmp_path / "fsdp2.json").write_text(json.dumps(result(2, True, 3000.0, [7.0, 7.2], "random:llama2-13b", 4)))
    multi_gpu_table.main([str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    expected = memory.estimate_training_memory("llama2-13b", batch_size=4, seq_len=512, shards=2).total / 2**30
    assert f"| 7.00-7.20 GiB | {expected:.2f} GiB |" in table


def test_multi_gpu_script_names_what_exists():
    """benchmarks/multi_gpu.sh runs only on a 2-GPU machine, which is rarely lent: what it imports, launches and
    reads must exist, or the GPU time is lost at its first line (it imported a renamed private function once)."""
    import importlib
    import re

    script = (ROOT / "benchmarks" / "multi_gpu.sh").read_text()
    imports = re.findall(r"from (qadapter_utils[\w.]*) import (\w+)", script)
    assert imports
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
    for path in re.findall(r"(?:--config_file |python3 )((?:configs|scripts|benchmarks)/[\w/.]+)", script):
        assert (ROOT / path).exists(), path
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "multi_gpu.sh")]).returncode == 0
