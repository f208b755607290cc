"""Train an adapter on a quantized Llama 2 with one or more processes — notebook 05's training code
(qadapter_utils.train.make_trainer on adapters.AdapterTrainer), launched by accelerate.

    # one process (the reference)
    python scripts/train_distributed.py --out runs/single
    # data parallel, 2 processes (GPUs if present, else the CPU with gloo)
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
        scripts/train_distributed.py --out runs/ddp2
    # sharded QLoRA on GPUs (FSDP; the 4-bit weights stored in bf16 so FSDP can shard them)
    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 \
        scripts/train_distributed.py --fsdp --model random:llama2-13b --out runs/fsdp2

--global-batch is split evenly across processes, so runs with 1 and N processes see the same samples per step
and (with token-weighted loss averaging across processes) compute the same update. Rank 0 alone saves the
adapter and writes <out>/result.json: world size, losses, tokens/s, peak memory per process, and how far the
adapter weights of the processes are apart (0.0 for DDP: they stay identical). Nothing already in --out is
overwritten: choose a new folder for each run. Introduced in notebooks/08_multi_gpu.ipynb.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or folder, or 'random:<shape>'")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--method", default="lora", help="an adapter preset of qadapter_utils.methods")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step, all processes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--synthetic-length", type=int, default=0,
                        help="train on random token rows of this length instead of the embedded task "
                             "(for speed and memory runs at real scale)")
    parser.add_argument("--fsdp", action="store_true", help="store the 4-bit weights in the compute dtype (FSDP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def _synthetic_rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    import torch.distributed as dist

    import qadapter_utils as qu
    from qadapter_utils.data import load_instruction_data
    from qadapter_utils.train import make_trainer, save_trained_adapter, step_stats

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world == 1 and "CUDA_VISIBLE_DEVICES" not in os.environ and torch.cuda.device_count() > 1:
        # Without a launcher the Trainer would spread one process over all GPUs with nn.DataParallel (a
        # different algorithm, with twice the batch): a single process means a single GPU.
        raise SystemExit("one process on a machine with several GPUs: set CUDA_VISIBLE_DEVICES=0 for a 1-GPU run, "
                         "or use accelerate launch for N processes")
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if args.fsdp and not torch.cuda.is_available():
        raise SystemExit("--fsdp (sharded QLoRA) needs CUDA GPUs: accelerate's FSDP does not run on the CPU. "
                         "On the CPU, train data-parallel instead: accelerate launch --config_file "
                         "configs/accelerate/ddp.yaml --num_processes 2 scripts/train_distributed.py --out ...")
    if fsdp_launch and not args.fsdp:
        raise SystemExit("launched with an FSDP config but without --fsdp: FSDP cannot shard the packed uint8 4-bit "
                         "weights. Add --fsdp (stores them in bfloat16, as FSDP-QLoRA needs).")
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} processes")
    if rank == 0 and args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} already holds files; nothing was changed. Choose a new --out folder.")
    torch.manual_seed(args.seed)
    quant_storage = "bfloat16" if args.fsdp else None
    model, tokenizer = qu.load_model(args.model, bits=args.bits, quant_storage=quant_storage)
    name = qu.add_adapter(model, args.method)
    # adapters.init replaces the decoder layer class; FSDP must wrap the class the model really has
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = type(model.model.layers[0]).__name__
    if args.synthetic_length:
        n = args.global_batch * args.steps
        train = _synthetic_rows(n, args.synthetic_length, model.config.vocab_size, args.seed)
    else:
        train, _ = load_instruction_data("world", seed=args.seed)
    overrides = dict(max_steps=args.steps, per_device_train_batch_size=args.global_batch // world,
                     learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     save_strategy="no", disable_tqdm=True, include_num_input_tokens_seen=True,
                     average_tokens_across_devices=True, ddp_find_unused_parameters=False,
                     output_dir=str(args.out / "trainer"), overwrite_output_dir=True, seed=args.seed)
    if not torch.cuda.is_available():
        overrides["use_cpu"] = True  # the gloo backend: data parallel on the CPU
    trainer = make_trainer(model, tokenizer, train, packing=True, max_length=args.max_length, **overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in trainable])
    spread = 0.0
    if world > 1 and not args.fsdp:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        group_device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        parts = [g.to(group_device) for g in gathered]
        dist.all_gather(parts, flat.to(group_device))
        spread = max(float((p.cpu() - flat).abs().max()) for p in parts)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    peaks = [peak]
    if world > 1 and peak is not None:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
    losses = [round(h["loss"], 6) for h in trainer.state.log_history if "loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen)
    step_seconds = step_stats(trainer)["seconds per step"]  # median, first step (warm-up) excluded
    result = {
        "model": args.model, "bits": args.bits, "method": args.method, "world_size": world, "fsdp": args.fsdp,
        "steps": args.steps, "global_batch": args.global_batch, "synthetic_length": args.synthetic_length,
        "losses": losses, "tokens": tokens,
        "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
        "median_step_seconds": round(step_seconds, 4),
        "steady_tokens_per_second": round(tokens / args.steps / step_seconds, 1),
        "peak_allocated_gib_per_process": [None if p is None else round(p / 2**30, 3) for p in peaks],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "max_weight_difference_between_processes": spread,
        "adapter_l2": float(flat.norm()),
    }
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.fsdp:
            save_trained_adapter(model, name, args.out / "adapter")
            torch.save(flat, args.out / "adapter_vector.pt")
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    if world > 1:
        dist.barrier()
        # left to interpreter exit, gloo's threads were torn down under a live group: "terminate called without an
        # active exception" (SIGABRT) in one rank, after all work was done, in 1 of 8 runs on a 2-core CPU
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
