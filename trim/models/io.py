"""Checkpoints and the model factory.

A model directory holds ``config.json`` (``{"model": ModelConfig, ...}``; training adds the
rest of the recipe beside it) and ``model.safetensors``. Writes are atomic: everything goes
to ``<dir>.tmp-<pid>`` first and is renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from trim.errors import CheckpointError
from trim.models.base import TrimModel
from trim.models.config import ModelConfig

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def create_model(cfg: ModelConfig | dict) -> TrimModel:
    """Build a randomly initialised model from its config."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    cfg.validate()
    if cfg.family == "dual":
        from trim.models.dual import DualStreamModel

        return DualStreamModel(cfg)
    from trim.models.vilt import ViltModel

    return ViltModel(cfg)


def save_model(model: TrimModel, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically. ``extra`` joins the config file."""
    final = Path(directory)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME))
    (tmp / CONFIG_NAME).write_text(json.dumps({"model": model.config.to_dict(), **(extra or {})}, indent=2))
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a trim model directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    return json.loads(path.read_text())


def load_model(directory: str | os.PathLike, map_location: str = "cpu") -> TrimModel:
    """Rebuild a model from a trim model directory, with no other input."""
    data = read_config(directory)
    if "model" not in data:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME} has no 'model' section; is this a trim checkpoint?")
    model = create_model(ModelConfig.from_dict(data["model"], where=f"{directory}/config.json:model"))
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    state = load_file(str(weights), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
