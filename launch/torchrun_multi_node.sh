#!/usr/bin/env bash
# Several machines, c10d rendezvous: run this same command on every node.
#
#   MASTER_ADDR=node01 NNODES=2 NPROC=8 launch/torchrun_multi_node.sh recipes/vqa2_meter_clip16_roberta_smarttrim.yaml
#
# MASTER_ADDR: a host every node can reach (it hosts the rendezvous store); MASTER_PORT: a free
# TCP port there (default 29500); RUN_ID: the same string on every node (default: the recipe
# name). Node ranks are assigned by the rendezvous. The run folder (output_dir) must be on
# storage every node sees: rank 0 writes the logs and renames checkpoints into place, every
# rank writes its own RNG / ZeRO files into them.
#
# Loopback test of the same code path on one machine (what tests/test_train_distributed.py does):
#   MASTER_ADDR=127.0.0.1 NNODES=2 NPROC=1 launch/torchrun_multi_node.sh RECIPE &  # "node" 1
#   MASTER_ADDR=127.0.0.1 NNODES=2 NPROC=1 launch/torchrun_multi_node.sh RECIPE    # "node" 2
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
NNODES=${NNODES:-2}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -ge 1 ]] || NPROC=1
fi
RUN_ID=${RUN_ID:-$(basename "${1%.yaml}")}
exec torchrun --nnodes="${NNODES}" --nproc_per_node="${NPROC}" \
  --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="${RUN_ID}" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m trim.train "$@"
