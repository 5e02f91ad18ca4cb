"""SmartTrim's training step vs plain fine-tuning at METER size (CLIP-ViT-B/16 + RoBERTa-base,
6 co-attention layers), measured interleaved in one process on this machine.

    python benchmarks/step_ratio_meter.py [--image-size 224] [--batch-size 4] [--rounds 5] [--threads N]

The model is ``trim.eval.bench_model.meter_config`` with random weights and the trimmers of
recipes/vqa2_meter_clip16_roberta_smarttrim.yaml; the objective (distillation, hidden cosine,
cost loss, Gumbel) is that recipe's. Random weights do not change the timing: the training
layout is masked, so every token is computed whatever the decisions. The tiny model's ratio
(``benchmarks/train_shapes.py --step-ratio-only``) is dominated by per-op overhead; this one is
what a METER-size run pays per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5, help="alternating plain / SmartTrim pairs timed")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--recipe", default=str(ROOT / "recipes/vqa2_meter_clip16_roberta_smarttrim.yaml"))
    args = p.parse_args()

    import dataclasses

    import torch
    import yaml

    from train_shapes import time_step_pairs
    from trim.config import load_recipe
    from trim.eval.bench_model import meter_config, model_inputs
    from trim.models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.recipe).read_text())
    # the METER-size architecture with the recipe's trimmers (its init_from run is not needed)
    raw["model"] = {**dataclasses.asdict(meter_config(args.image_size)), "trim": raw["model"]["trim"]}
    raw["data"]["image_size"] = args.image_size
    recipe = load_recipe(raw)
    cfg = recipe.model.config
    torch.manual_seed(0)
    model = create_model(cfg).train()
    batches = []
    for seed in range(2):
        batch = model_inputs(cfg, args.batch_size, args.text_len, seed=seed)
        batch["labels"] = torch.rand(args.batch_size, cfg.num_labels, generator=torch.Generator().manual_seed(seed))
        batches.append(batch)
    started = time.perf_counter()
    t = time_step_pairs(model, recipe, batches, rounds=args.rounds, warmup=args.warmup)
    print(f"METER-size dual model ({args.image_size} px, batch {args.batch_size}, text {args.text_len}, "
          f"{torch.get_num_threads()} threads; trimmers and objective of {Path(args.recipe).name}), "
          f"{args.rounds} alternating pairs, medians:")
    print(f"  step with AdamW:       plain fine-tuning {t['plain']:.3f} s, SmartTrim {t['smarttrim']:.3f} s "
          f"-> {t['smarttrim'] / t['plain']:.2f}x")
    print(f"  forward + backward:    plain fine-tuning {t['plain_compute']:.3f} s, SmartTrim "
          f"{t['smarttrim_compute']:.3f} s -> {t['smarttrim_compute'] / t['plain_compute']:.2f}x "
          f"({time.perf_counter() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
