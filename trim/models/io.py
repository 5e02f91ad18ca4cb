"""Checkpoints and the model factory: the one place trim reads and writes model weights.

A model directory holds ``config.json`` (``{"model": ModelConfig, ...}``; training adds the
rest of the recipe beside it) and ``model.safetensors``. Writes are atomic: everything goes
to ``<dir>.tmp-<pid>`` first and is renamed into place once complete.

Every load goes through `load_weights` (as open_clip's ``load_checkpoint``): the only keys a
state dict may lack are the parts a caller says start fresh (`fresh_keys`: trimmers, a new
task head); everything else missing, unexpected or of another shape is a `CheckpointError`
that names the source and the keys. A run folder resolves to the checkpoint its ``latest``
file names (`resolve_checkpoint`), for ``trim eval``, ``model.init_from``,
``model.pretrained`` and ``train.resume`` alike.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trim.errors import CheckpointError, ConfigError
from trim.models.base import TrimModel
from trim.models.config import ModelConfig
from trim.prune import trimmer_modules
from trim.prune.calibrate import Calibration, CalibrationError

if TYPE_CHECKING:  # the sam family imports segment-anything: only when one is built
    from trim.models.sam import Sam

CONFIG_NAME, WEIGHTS_NAME, LATEST_NAME = "config.json", "model.safetensors", "latest"
# config.json's section with the fitted budget -> logit shift table (trim.prune.calibrate). Not part
# of the model config: a recipe cannot set it and init_from does not inherit a stale one.
CALIBRATION_KEY = "calibration"


def create_model(cfg: ModelConfig | dict) -> TrimModel | Sam:
    """Build a randomly initialised model from its config."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    cfg.validate()
    if cfg.family == "sam":
        from trim.models.sam import Sam

        return Sam(cfg)
    if cfg.family == "dual":
        from trim.models.dual import DualStreamModel

        return DualStreamModel(cfg)
    from trim.models.vilt import ViltModel

    return ViltModel(cfg)


def save_model(model: TrimModel | Sam, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically. ``extra`` joins the config file."""
    final = Path(directory)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME))
    config: dict[str, Any] = {"model": model.config.to_dict()}
    if getattr(model, "calibration", None) is not None:
        config[CALIBRATION_KEY] = model.calibration.to_dict()
    (tmp / CONFIG_NAME).write_text(json.dumps({**config, **(extra or {})}, indent=2))
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


# ----------------------------------------------------------------------------- finding a checkpoint


def is_model_dir(path: str | os.PathLike) -> bool:
    """A trim model directory: ``config.json`` with a ``model`` section (not a transformers one)."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return True  # ours by layout; read_config reports what is wrong with it
    return isinstance(data, dict) and "model" in data


def resolve_checkpoint(path: str | os.PathLike, key: str = "checkpoint") -> Path:
    """The model directory ``path`` names: itself, or the one a run folder's ``latest`` file names.

    ``key`` is what the user set (``model.init_from``, ``trim eval CHECKPOINT``, ...); errors name it.
    """
    p = Path(path)
    if p.is_file() and p.name == LATEST_NAME:
        p = p.parent
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        return p
    pointer = p / LATEST_NAME
    if p.is_dir() and pointer.is_file():
        name = pointer.read_text().strip()
        target = p / name
        if not target.is_dir():
            raise CheckpointError(f"{key}={str(path)!r}: {pointer} names {name!r}, which does not exist; point "
                                  f"{key} at one of the step_* directories, or write the name of one into {pointer}")
        if not (target / CONFIG_NAME).is_file():
            raise CheckpointError(f"{key}={str(path)!r}: {pointer} names {name!r}, which has no {CONFIG_NAME} "
                                  "(an incomplete checkpoint)")
        return target
    if p.is_dir():
        raise CheckpointError(f"{key}={str(path)!r} is neither a checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a run "
                              f"folder with a '{LATEST_NAME}' file")
    raise CheckpointError(f"{key}={str(path)!r} does not exist; give a checkpoint directory (runs/<name>/step_<N>) or "
                          "a run folder (runs/<name>, whose latest checkpoint is used)")


# ----------------------------------------------------------------------------- reading one


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a trim model directory (it must have a ``model`` section)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a trim model directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); the checkpoint is corrupt, use another "
                              "step_* directory") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' section; is this a trim checkpoint?")
    return data


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a trim model directory, checked key by key."""
    path = Path(directory) / CONFIG_NAME
    try:
        return ModelConfig.from_dict(read_config(directory)["model"], where=f"{path}: model")
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def read_weights(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Tensor]:
    """A ``model.safetensors`` file as a state dict; a missing or damaged file is a `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the file is truncated or not safetensors") from err


# ----------------------------------------------------------------------------- loading weights


def trimmer_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every token / head trimmer in ``model`` (they start fresh on conversion)."""
    return {f"{name}.{key}" for name, module in trimmer_modules(model) for key in module.state_dict()}


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the task head and the model's other task-specific modules (``task_modules``,
    e.g. NLVR2's per-image type embeddings): fresh when the source has another task or label count."""
    modules = ((name, getattr(model, name, None)) for name in getattr(model, "task_modules", ("head",)))
    return {f"{name}.{k}" for name, module in modules if module is not None for k in module.state_dict()}


def load_weights(model: nn.Module, state: Mapping[str, Tensor], *, source: str,
                 fresh: Iterable[str] = ()) -> list[str]:
    """Load ``state`` into ``model``; only the keys in ``fresh`` may be absent from it.

    Returns the fresh keys that kept their initialisation. A key of ``model`` missing from
    ``state`` (and not fresh), a key of ``state`` that ``model`` lacks, or a tensor of another
    shape raises `CheckpointError` naming ``source`` and the keys.
    """
    fresh = set(fresh)
    own = model.state_dict()
    wrong_shape = [f"{k}: {tuple(v.shape)} in the source, {tuple(own[k].shape)} in the model"
                   for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(k for k in own if k not in state and k not in fresh)
    unexpected = sorted(k for k in state if k not in own)
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) of another shape ({'; '.join(wrong_shape[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems)
                              + ". Its config and weights must describe the same architecture; only trimmers and a "
                              "new task head may be new")
    model.load_state_dict(state, strict=False)
    return sorted(k for k in own if k not in state)


def load_model(directory: str | os.PathLike, map_location: str = "cpu") -> TrimModel | Sam:
    """Rebuild a model from a trim model directory (or a run folder: its ``latest``), with no other input."""
    directory = resolve_checkpoint(directory)
    model = create_model(read_model_config(directory))
    weights = directory / WEIGHTS_NAME
    load_weights(model, read_weights(weights, map_location), source=f"{weights} (built from {directory / CONFIG_NAME})")
    model.calibration = read_calibration(directory)
    return model


def read_calibration(directory: str | os.PathLike) -> Calibration | None:
    """The checkpoint's budget calibration (``config.json``'s ``calibration``), None when uncalibrated."""
    data = read_config(directory).get(CALIBRATION_KEY)
    if data is None:
        return None
    where = f"{Path(directory) / CONFIG_NAME}: {CALIBRATION_KEY}"
    try:
        return Calibration.from_dict(data, where=where)
    except CalibrationError as err:
        raise CheckpointError(str(err)) from err


def write_calibration(directory: str | os.PathLike, calibration: Calibration) -> Path:
    """Store ``calibration`` in a checkpoint's ``config.json``, every other key kept, atomically
    (a temporary file renamed over it: a crash leaves the old file or the new one)."""
    path = Path(directory) / CONFIG_NAME
    data = read_config(directory)
    data[CALIBRATION_KEY] = calibration.to_dict()
    tmp = path.with_name(f"{CONFIG_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def transfer_weights(source_model: nn.Module, model: nn.Module, *, source: str) -> list[str]:
    """Copy ``source_model``'s backbone into ``model``, which may place other trimmers or another head.

    The source's trimmers and head go across where ``model`` has the same ones (same keys and
    shapes) and are left behind otherwise; ``model``'s own trimmers and head start fresh where
    the source has none. Everything else must match exactly (`load_weights`).
    """
    own = model.state_dict()
    optional = trimmer_keys(source_model) | head_keys(source_model)
    state = {k: v for k, v in source_model.state_dict().items()
             if k not in optional or (k in own and tuple(own[k].shape) == tuple(v.shape))}
    return load_weights(model, state, source=source, fresh=trimmer_keys(model) | head_keys(model))
