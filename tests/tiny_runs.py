"""Tiny runs and batches shared by several test files (not tests themselves)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_recipe(data_root: Path, out: Path, **sections) -> dict:
    raw = {
        "name": "tiny",
        "output_dir": str(out),
        "model": {
            "family": "dual", "task": "vqa", "num_labels": 25,
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
            "text": {"vocab_size": 256, "width": 32, "layers": 2, "heads": 2},
            "cross_layers": 2, "cross_width": 32, "cross_heads": 2,
            "trim": {"vision_token_layers": [1], "cross_token_layers": [0, 1], "cross_head_layers": [0, 1]},
        },
        "data": {"root": str(data_root), "task": "vqa", "image_size": 32, "batch_size": 4, "shuffle_buffer": 32},
        "train": {"steps": 4, "lr": 1e-3, "trimmer_lr": 1e-2, "warmup": 1, "save_every": 2, "eval_every": 2,
                  "log_every": 1, "progress": False},
        "objective": {"method": "smarttrim", "target": 0.6, "hidden_cosine": 0.1,
                      "curriculum": {"steps": 4}, "gumbel": {"tau_start": 1.0, "tau_end": 0.5}},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return raw


def vl_batch(b: int = 3, images: int | None = None) -> dict:
    """A VL batch for the default 64-px models: 8 text tokens (sample 1 padded after 5), one image
    per sample, or ``images`` per sample (NLVR2)."""
    ids = torch.randint(5, 500, (b, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[mask == 0] = 0
    shape = (b, 3, 64, 64) if images is None else (b, images, 3, 64, 64)
    return {"pixel_values": torch.randn(shape), "input_ids": ids, "attention_mask": mask}
