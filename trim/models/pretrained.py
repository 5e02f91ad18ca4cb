"""`from_pretrained(name_or_dir)`: one entry point for trim checkpoints and the models users have.

* a trim model directory (``config.json`` with a ``model`` section) -> `load_model`;
* a transformers checkpoint — a local directory or a hub name, resolved through the same
  ``from_pretrained`` call transformers itself uses (offline it needs the local copy) —
  whose ``model_type`` has a converter in ``trim.models.convert``;
* ``open_clip:<model name>`` (+ ``pretrained=`` tag or state-dict path) for CLIP towers,
  returned as `trim.models.convert.open_clip.ClipTowers` (image and text towers, no task head).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from trim.models.io import CONFIG_NAME, load_model


def from_pretrained(name_or_dir: str | os.PathLike, **kwargs: Any) -> nn.Module:
    path = Path(name_or_dir)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        config = json.loads((path / CONFIG_NAME).read_text())
        if "model" in config:
            return load_model(path)
    from trim.models import convert

    return convert.convert_pretrained(str(name_or_dir), **kwargs)


