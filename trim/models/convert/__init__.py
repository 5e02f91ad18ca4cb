"""Pretrained weights -> trim modules. Each converter is proven equal to its source (invariant 2)."""

from __future__ import annotations

from typing import Any

from torch import nn

from trim.errors import CheckpointError


def convert_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """Dispatch on the source: ``open_clip:...`` (-> `ClipTowers`, CLIP has no task head) or a
    transformers checkpoint's model_type (-> a `TrimModel`)."""
    if name.startswith("open_clip:"):
        from trim.models.convert.open_clip import convert_open_clip

        return convert_open_clip(name.removeprefix("open_clip:"), **kwargs)
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
    raise CheckpointError(f"{name!r} is a transformers {model_type!r} model; trim converts vilt and bridgetower "
                          f"(and open_clip:<name> towers)")
