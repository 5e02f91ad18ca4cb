"""Pretrained weights -> trim modules. Each converter is proven equal to its source (invariant 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from trim.errors import CheckpointError


def convert_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """Dispatch on the source: ``open_clip:...`` (-> `ClipTowers`, CLIP has no task head), a file
    (a segment-anything ``.pth`` state dict -> `Sam`) or a transformers checkpoint's model_type
    (-> a `TrimModel`, or `Sam` for ``sam``)."""
    if name.startswith("open_clip:"):
        from trim.models.convert.open_clip import convert_open_clip

        return convert_open_clip(name.removeprefix("open_clip:"), **kwargs)
    if Path(name).is_file():  # the one single-file format trim converts
        from trim.models.convert.sam import convert_segment_anything

        return convert_segment_anything(name, **kwargs)
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except OSError as err:
        raise CheckpointError(f"cannot load {name!r}: not a trim model directory, and transformers could not "
                              f"find it ({err}). Offline, pass a local directory.") from err
    if model_type == "vilt":
        from trim.models.convert.vilt import convert_vilt

        return convert_vilt(name, **kwargs)
    if model_type == "bridgetower":
        from trim.models.convert.bridgetower import convert_bridgetower

        return convert_bridgetower(name, **kwargs)
    if model_type == "sam":
        from trim.models.convert.sam import convert_sam_transformers

        return convert_sam_transformers(name, **kwargs)
    raise CheckpointError(f"{name!r} is a transformers {model_type!r} model; trim converts vilt, bridgetower and sam "
                          f"(and open_clip:<name> towers, segment-anything .pth files)")
