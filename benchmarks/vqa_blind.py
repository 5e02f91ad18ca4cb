"""Does a VQA checkpoint look at the image? Full vs blind accuracy on one split.

    python benchmarks/vqa_blind.py CHECKPOINT --data data/shapes [--split val] [--max-samples N]

Runs the checkpoint (trimming off) three times over the same questions:

* ``full``: the real images;
* ``blind``: every ``pixel_values`` replaced by a constant (0, the mean grey after the
  loader's normalisation): what the question alone gives;
* ``shuffled``: each question paired with another sample's image (a rolled batch).

and prints the VQA soft accuracy (score of the argmax answer) overall and per question type.
A model that uses the image is far above ``blind``; ``full == blind`` means the image is
ignored (issue 11).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch


def accuracies(model, loader, max_samples: int | None) -> dict[str, dict[str, float]]:
    sums: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in ("full", "blind", "shuffled")}
    seen = 0
    with torch.inference_mode():
        for batch in loader:
            inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
            variants = {
                "full": inputs["pixel_values"],
                "blind": torch.zeros_like(inputs["pixel_values"]),
                # roll by 3: consecutive synthetic questions share an image (3 per scene)
                "shuffled": torch.roll(inputs["pixel_values"], 3, 0),
            }
            for mode, pixels in variants.items():
                logits = model({**inputs, "pixel_values": pixels}, trim="off").logits
                score = batch["labels"].gather(1, logits.argmax(-1, keepdim=True))[:, 0]
                for qtype, s in zip(batch["question_type"], score.tolist()):
                    sums[mode][qtype].append(s)
                    sums[mode]["all"].append(s)
            seen += len(batch["question_type"])
            if max_samples is not None and seen >= max_samples:
                break
    return {m: {q: 100.0 * sum(v) / len(v) for q, v in per.items()} for m, per in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model directory or run folder")
    p.add_argument("--data", required=True, help="shard root written by `trim data synth`")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--max-samples", type=int)
    args = p.parse_args(argv)

    from trim.data import build_loader
    from trim.data.shards import split_urls
    from trim.models.io import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint, "CHECKPOINT")
    model = load_model(ckpt).eval()
    cfg = model.config
    if cfg.task != "vqa":
        print(f"{ckpt} is a {cfg.task} model; this script evaluates VQA", file=sys.stderr)
        return 2
    loader = build_loader(split_urls(args.data, "vqa", args.split), "vqa", tokenizer=args.data,
                          batch_size=args.batch_size, mode="eval", image_size=cfg.vision.image_size,
                          answer_vocab=Path(args.data) / "vqa" / "answers.json")
    acc = accuracies(model, loader, args.max_samples)
    types = ["all"] + sorted(q for q in acc["full"] if q != "all")
    print(f"{ckpt} on {args.data} vqa/{args.split}: VQA accuracy (%)")
    print(f"{'question type':<20}" + "".join(f"{m:>10}" for m in acc) + f"{'full-blind':>12}")
    for q in types:
        row = "".join(f"{acc[m][q]:>10.1f}" for m in acc)
        print(f"{q:<20}{row}{acc['full'][q] - acc['blind'][q]:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
