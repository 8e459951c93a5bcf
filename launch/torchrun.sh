#!/usr/bin/env bash
# train.py under torchrun, on one node or many (no DeepSpeed launcher, no ssh): run it once on every node.
#
#   one node, all its GPUs:  launch/torchrun.sh --config configs/ntk_parts_32k.yaml
#   two nodes:               NNODES=2 NODE_RANK=0 MASTER_ADDR=node-01 launch/torchrun.sh --config configs/ntk_parts_32k.yaml
#                            NNODES=2 NODE_RANK=1 MASTER_ADDR=node-01 launch/torchrun.sh --config configs/ntk_parts_32k.yaml
#
# Arguments go to train.py (after a default --resume auto, so a restarted job continues from its newest checkpoint;
# pass --resume never to refuse an existing run folder). Paths are relative to the repository root.
# Variables (all optional):
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1 (default 0); node 0 hosts the rendezvous
#   NPROC_PER_NODE  processes (GPUs) on this node (default: the GPUs `nvidia-smi -L` lists, else 1)
#   MASTER_ADDR     address of node 0 that every node can reach (default 127.0.0.1: one node)
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   VENV            the Python environment with torch and deepspeed (default: the repository's .venv)
#   DRY_RUN         1: print the torchrun command instead of running it
# NCCL settings for multi-node jobs (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...): see launch/slurm_deepspeed.sbatch.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ $NPROC_PER_NODE -ge 1 ]] || NPROC_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
VENV=${VENV:-$REPO/.venv}
DRY_RUN=${DRY_RUN:-0}

CMD=("$VENV/bin/torchrun" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" train.py --resume auto "$@")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
