#!/usr/bin/env bash
# One machine, N processes (one per GPU; on a CPU-only machine N gloo processes).
#
#   launch/torchrun_single_node.sh recipes/shapes_vqa_dual_tiny_smarttrim.yaml [key=value ...]
#   NPROC=8 launch/torchrun_single_node.sh recipes/vqa2_meter_clip16_roberta_smarttrim.yaml
#
# data.batch_size in the recipe is per process: the global batch is batch_size x grad_accum x N.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -ge 1 ]] || NPROC=1
fi
exec torchrun --standalone --nnodes=1 --nproc_per_node="${NPROC}" -m trim.train "$@"
