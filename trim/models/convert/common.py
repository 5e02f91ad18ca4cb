"""What every converter shares: source activation names and the square-size check."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from trim.errors import CheckpointError, ConfigError

# (regex over a source key, its trim name: a re.sub template or a function of the match)
RenameRule = tuple[str, str | Callable[[re.Match], str]]

# transformers' ``hidden_act`` names -> trim's activations (`trim.nn.mlp.ACTIVATIONS`). Each is the
# same function: "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation, "gelu_python"
# the exact erf GELU. Names not listed are refused rather than approximated.
TRANSFORMERS_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}


def transformers_activation(name: str, key: str) -> str:
    """trim's activation for a transformers ``hidden_act``; ``key`` names the setting in errors."""
    if name not in TRANSFORMERS_ACTIVATIONS:
        raise ConfigError(f"{key}={name!r} has no trim activation; trim maps {sorted(TRANSFORMERS_ACTIVATIONS)}")
    return TRANSFORMERS_ACTIVATIONS[name]


def square_size(value: int | Sequence[int], key: str) -> int:
    """One side of a square size given as an int or a (height, width) pair.

    trim's patch embedding is square, so a non-square image or patch size is a `ConfigError`
    naming ``key`` (e.g. ``"vision_config.image_size"``) rather than a silently used first side.
    """
    if isinstance(value, int):
        return value
    sides = {int(v) for v in value}
    if len(sides) != 1:
        raise ConfigError(f"{key}={list(value)} is not square: trim's patch embedding takes square images and "
                          f"patches; give one value for height and width")
    return sides.pop()


def rename_state(state: Mapping[str, Tensor], rules: Sequence[RenameRule], *, source: str,
                 target: str) -> dict[str, Tensor]:
    """``state`` under trim's names: each key takes the first rule whose pattern matches all of it.

    A key no rule matches is a `CheckpointError` naming it, ``source`` and ``target``: either the
    checkpoint is not the kind the converter reads, or its library renamed a parameter.
    """
    out = {}
    for key, value in state.items():
        for pattern, name in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[match.expand(name) if isinstance(name, str) else name(match)] = value
                break
        else:
            raise CheckpointError(f"{source}: parameter {key!r} has no place in {target}; is this the checkpoint "
                                  "kind the converter expects (or did its library rename parameters)?")
    return out
