"""`from_pretrained(name_or_dir)`: one entry point for trim checkpoints and the models users have.

* a trim model directory (``config.json`` with a ``model`` section), or a run folder whose
  ``latest`` file names one -> `load_model`;
* a transformers checkpoint — a local directory or a hub name, resolved through the same
  ``from_pretrained`` call transformers itself uses (offline it needs the local copy) —
  whose ``model_type`` has a converter in ``trim.models.convert``;
* ``open_clip:<model name>`` (+ ``pretrained=`` tag or state-dict path) for CLIP towers,
  returned as `trim.models.convert.open_clip.ClipTowers` (image and text towers, no task head).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from trim.models.io import LATEST_NAME, is_model_dir, load_model, resolve_checkpoint


def from_pretrained(name_or_dir: str | os.PathLike, **kwargs: Any) -> nn.Module:
    path = Path(name_or_dir)
    if is_model_dir(path) or (path / LATEST_NAME).is_file():  # a trim checkpoint or run folder
        return load_model(resolve_checkpoint(path, "pretrained"))
    from trim.models import convert

    return convert.convert_pretrained(str(name_or_dir), **kwargs)
