#!/usr/bin/env bash
# Multi-GPU adapter training on a 4-bit base (issue 7), on a machine with 2+ CUDA GPUs:
#   1. DDP tokens/s scaling, 1 -> N GPUs, Llama-2-7B shape (random weights), QLoRA r=16 on q,v, 512-token rows,
#      8 rows per GPU per step (weak scaling: the per-GPU work stays the same);
#   2. FSDP (sharded QLoRA) peak memory per GPU for the Llama-2-13B shape.
# Usage: OUT=results_dir bash benchmarks/multi_gpu.sh [N]     (writes OUT/*.json and OUT/multi_gpu.log)
set -uo pipefail
N=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
OUT=${OUT:-benchmarks/results/multi_gpu}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 QADAPTER_CACHE=${QADAPTER_CACHE:-/tmp/qadapter}
STEPS=${STEPS:-10}
COMMON="--bits 4 --method lora --synthetic-length 512 --steps $STEPS --lr 1e-4"
python3 -c "from qadapter_utils.models import random_checkpoint; import torch; random_checkpoint('llama2-7b', torch.bfloat16)"
CUDA_VISIBLE_DEVICES=0 python3 scripts/train_distributed.py --model random:llama2-7b $COMMON --global-batch 8 --out "$OUT/ddp1"
cp "$OUT/ddp1/result.json" "$OUT/ddp1.json"
python3 -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes "$N" scripts/train_distributed.py \
  --model random:llama2-7b $COMMON --global-batch $((8 * N)) --out "$OUT/ddp$N"
cp "$OUT/ddp$N/result.json" "$OUT/ddp$N.json"
rm -rf /tmp/qadapter/random-llama2-7b-*   # disk: the 13B checkpoint needs the room
python3 -c "from qadapter_utils.models import random_checkpoint; import torch; random_checkpoint('llama2-13b', torch.bfloat16)"
python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes "$N" scripts/train_distributed.py \
  --model random:llama2-13b --fsdp --bits 4 --method lora --synthetic-length 512 --steps 4 --lr 1e-4 \
  --global-batch $((4 * N)) --out "$OUT/fsdp$N"
cp "$OUT/fsdp$N/result.json" "$OUT/fsdp$N.json" 2>/dev/null || echo "FSDP run wrote no result"
python3 benchmarks/multi_gpu_table.py "$OUT"   # OUT/table.md: weak scaling, FSDP peak per GPU vs the estimator
