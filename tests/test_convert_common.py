"""One activation table and one square-size check for every converter."""

import open_clip
import pytest
import torch
import transformers
from torch import nn

from trim.errors import ConfigError
from trim.models.convert import bridgetower, roberta, vilt
from trim.models.convert.common import TRANSFORMERS_ACTIVATIONS, square_size
from trim.models.convert.open_clip import _activation, vision_tower_from_open_clip
from trim.nn.mlp import ACTIVATIONS, make_activation


def bridgetower_config(act: str = "gelu", **vision) -> transformers.BridgeTowerConfig:
    return transformers.BridgeTowerConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=40, hidden_act=act),
        vision_config={"hidden_size": 64, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8, **vision})


def vilt_config(act: str = "gelu", **kw) -> transformers.ViltConfig:
    kw = {"image_size": 32, "patch_size": 8, **kw}
    return transformers.ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   hidden_act=act, **kw)


def converted_activation(converter: str, act: str) -> str:
    """The trim activation each transformers converter picks for ``hidden_act=act``."""
    if converter == "bridgetower":
        hf = bridgetower_config(act)
        bridgetower.check_supported(hf)
        return bridgetower.model_config(hf, task="itm", num_labels=2).text.act
    if converter == "vilt":
        return vilt._model_config(vilt_config(act), "vqa", None, 3, None).vision.act
    return roberta.text_config_from_transformers(transformers.BertConfig(hidden_act=act)).act


def test_square_size():
    assert square_size(32, "image_size") == 32
    assert square_size([32, 32], "image_size") == 32
    assert square_size((16, 16), "patch_size") == 16
    with pytest.raises(ConfigError, match=r"vision_config.image_size=\[32, 48\] is not square"):
        square_size((32, 48), "vision_config.image_size")


@pytest.mark.parametrize("key", ["image_size", "patch_size"])
def test_non_square_sizes_are_refused_naming_the_setting(key):
    size = {"image_size": [32, 48], "patch_size": [8, 16]}[key]
    with pytest.raises(ConfigError, match=rf"vision_config.{key}=\[.*\] is not square"):
        bridgetower.check_supported(bridgetower_config(**{key: size}))
    with pytest.raises(ConfigError, match=rf"vision_config.{key}=\[.*\] is not square"):
        # model_config alone no longer takes the first side of a non-square size
        bridgetower.model_config(bridgetower_config(**{key: size}), task="itm", num_labels=2)
    with pytest.raises(ConfigError, match=rf"ViLT config.{key}=\[.*\] is not square"):
        vilt._model_config(vilt_config(**{key: size}), "vqa", None, 3, None)
    cfg = open_clip.CLIPVisionCfg(image_size=32, patch_size=8, layers=1, width=32, head_width=8)
    setattr(cfg, key, tuple(size))
    visual = open_clip.CLIP(16, cfg, open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=4,
                                                            layers=1)).visual
    with pytest.raises(ConfigError, match=rf"open_clip visual.{key}=\[.*\] is not square"):
        vision_tower_from_open_clip(visual)


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_ACTIVATIONS))
def test_each_transformers_activation_maps_the_same_way_in_every_converter(name):
    trim_name = TRANSFORMERS_ACTIVATIONS[name]
    assert trim_name in ACTIVATIONS
    for converter in ("bridgetower", "vilt", "roberta"):
        assert converted_activation(converter, name) == trim_name, converter
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(make_activation(trim_name)(x), transformers.activations.ACT2FN[name](x),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("converter", ["bridgetower", "vilt", "roberta"])
def test_unknown_activations_are_refused_naming_the_setting(converter):
    with pytest.raises(ConfigError, match=r"hidden_act='silu' has no trim activation"):
        converted_activation(converter, "silu")


@pytest.mark.parametrize("module", [open_clip.transformer.QuickGELU(), nn.GELU(), nn.GELU(approximate="tanh"),
                                    nn.ReLU()], ids=lambda m: repr(m))
def test_open_clip_activation_modules_map_to_the_same_function(module):
    name = _activation(module, "open_clip visual MLP")
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(make_activation(name)(x), module(x), atol=1e-6, rtol=1e-6)
