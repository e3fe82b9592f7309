#!/usr/bin/env bash
# ViTP pretraining of InternVL2.5-1B on one node with 8 GPUs (the paper used 8x A40, about 23 h).
# Several nodes: set NNODES, NODE_RANK and MASTER_ADDR on each node.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
torchrun --nproc_per_node "$GPUS" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m vitp.cli pretrain --config configs/vitp_internvl2_5_1b.yaml "$@"
