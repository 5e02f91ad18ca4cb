"""`trim pretrain-vision`: teach a vision tower what the synthetic world's objects look like.

    trim pretrain-vision RECIPE --data SHARDS --out DIR [--steps 1500] [--lr 2e-3] [--batch-size 64]

Real VL models start from pretrained towers; a tiny tower trained from scratch by VQA alone
learns colours but hardly shapes (the answer is a weak, late signal for what each patch
shows), and the whole model stalls near the language prior. The synthetic world knows every
object's mask and attributes, so the tower is first trained densely: every patch token
predicts the colour, shape and size of the object covering it (background: class 0), with one
linear probe per attribute on the tower's final tokens::

    loss = sum over attributes a of CE(probe_a(ln_post(tower(image)))[patch], label_a[patch])

A patch is labelled with the object covering most of it, if that object covers at least
``MIN_COVER`` of its pixels (a sliver of an edge says little about the object's shape).

The output is a complete checkpoint of the recipe's model (``config.json`` +
``model.safetensors``): the trained tower, everything else at its initialisation, and no
probes. Training starts from it with ``model.init_from=DIR``; keep the tower's learning rate
low at first (``train.lr_mult: {vision.: 0.05}``) so the fresh cross layers' early gradients
do not wash its features out. Reads the seg shards of ``trim data synth --tasks seg``
(synthetic only: real SA-1B annotations carry no attributes).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trim.errors import DataError, TrimError

MIN_COVER = 0.2


def attribute_classes() -> dict[str, list[str]]:
    from trim.data.synthetic import COLORS, SHAPES, SIZES

    return {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}


def patch_targets(masks: Tensor, attributes: list[dict[str, str]], grid: int) -> Tensor:
    """(attributes, grid * grid) class ids (0 = background) from (objects, H, W) masks."""
    classes = attribute_classes()
    targets = torch.zeros(len(classes), grid * grid, dtype=torch.long)
    if not len(attributes):
        return targets
    h, w = masks.shape[-2:]
    cover = F.adaptive_avg_pool2d(masks.float(), grid).flatten(1)  # (objects, P): covered fraction
    best, owner = cover.max(0)
    hit = best >= MIN_COVER
    for k, (name, values) in enumerate(classes.items()):
        ids = torch.tensor([values.index(a[name]) + 1 for a in attributes])
        targets[k, hit] = ids[owner[hit]]
    return targets


class PatchProbes(nn.Module):
    """One linear classifier per attribute over the tower's patch tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values) + 1)
                                    for name, values in attribute_classes().items()})  # fmt: skip

    def loss(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        total, accuracy = tokens.new_zeros(()), {}
        for k, (name, head) in enumerate(self.heads.items()):
            logits, y = head(tokens), targets[:, k]
            total = total + F.cross_entropy(logits.flatten(0, 1), y.flatten())
            on_objects = y > 0
            accuracy[name] = float((logits.argmax(-1) == y)[on_objects].float().mean()) if on_objects.any() else 0.0
        return total, accuracy


def tower_tokens(vision: nn.Module, pixels: Tensor) -> Tensor:
    """The vision tower's final patch tokens (no trimming), (B, P, D)."""
    x, _ = vision.embed_tokens(pixels)
    for block in vision.stack.blocks:
        x = block(x)
    return vision.ln_post(x)[:, 1:]


def _batches(data: Path, image_size: int, grid: int, batch_size: int, seed: int):
    from trim.data import split_urls
    from trim.data.shards import read_manifest
    from trim.data.stream import build_loader

    manifest = read_manifest(data)
    if "seg" not in manifest.get("sources", {}):
        raise DataError(f"{data}/manifest.json lists no seg shards; write them with "
                        f"`trim data synth --out {data} --tasks vqa,seg` (the synthetic world's masks and attributes)")
    urls = split_urls(data, "seg", "train")
    loader = build_loader(urls, "seg", batch_size=batch_size, mode="train", image_size=image_size, seed=seed)
    for epoch in itertools.count():  # a loader pass is one epoch; pretraining may take several
        loader.set_epoch(epoch)
        for batch in loader:
            if any(a is None for a in batch["attributes"]):
                raise DataError(f"{data}/seg: a sample has no object attributes (shape/color/size); pretrain-vision "
                                "needs the synthetic world's seg shards, not converted SA-1B/COCO")
            targets = torch.stack([patch_targets(m, a, grid) for m, a in zip(batch["masks"], batch["attributes"])])
            yield batch["pixel_values"], targets


def pretrain_vision(recipe: str | Mapping[str, Any], data: str | Path, out: str | Path, *, steps: int = 1500, lr: float = 2e-3,
                    batch_size: int = 64, seed: int = 0, overrides: list[str] | None = None,
                    progress: bool = True) -> dict[str, float]:  # fmt: skip
    """Train the recipe model's vision tower on patch attributes; save the whole model to ``out``."""
    from tqdm import tqdm

    from trim.config import load_recipe
    from trim.models.io import create_model, save_model

    cfg = load_recipe(recipe, overrides or []).model.config
    if cfg.family != "dual":
        raise TrimError(f"{recipe}: model.family={cfg.family!r}; pretrain-vision trains the dual-stream vision tower")
    torch.manual_seed(seed)
    model = create_model(cfg)
    vision, probes = model.vision, PatchProbes(cfg.vision.width)
    params = [*vision.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batches = _batches(Path(data), cfg.vision.image_size, cfg.vision.grid, batch_size, seed)
    bar = tqdm(range(steps), desc="pretrain-vision", disable=not progress)
    accuracy: dict[str, float] = {}
    for step in bar:
        pixels, targets = next(batches)
        loss, accuracy = probes.loss(tower_tokens(vision, pixels), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in accuracy.items()})
    save_model(model, out, extra={"pretrain_vision": {"steps": steps, "data": str(data), "accuracy": accuracy}})
    return accuracy


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trim pretrain-vision", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="the recipe whose model.* is trained (its vision tower)")
    p.add_argument("--data", required=True, help="synthetic shard root with seg shards (trim data synth --tasks seg)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (use as model.init_from)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value), e.g. model.vision.stem=conv")
    a = p.parse_intermixed_args(argv)
    start = time.time()
    try:
        accuracy = pretrain_vision(a.recipe, a.data, a.out, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                                   seed=a.seed, overrides=a.overrides, progress=not a.quiet)  # fmt: skip
    except TrimError as exn:
        print(f"trim pretrain-vision: {type(exn).__name__}: {exn}", file=sys.stderr)
        return 1
    per = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
    print(f"pretrain-vision: wrote {a.out} in {time.time() - start:.0f}s; last batch's accuracy on object patches: {per}")
    return 0
