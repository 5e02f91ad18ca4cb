"""transformers BERT / RoBERTa encoders -> trim's post-norm `TextTower` (invariant 2).

``text_tower_from_transformers(name_or_dir) -> (TextConfig, state_dict)`` loads the checkpoint
through ``transformers.AutoModel.from_pretrained`` (a hub name, or offline a local
directory) and maps its encoder onto `TextTower`; the pooler is not part of a `TextTower`
and is dropped (trim's dual-stream models pool after their cross layers).

Position conventions, kept by `TextConfig.roberta_positions`:

* BERT numbers positions 0..N-1 whatever the padding;
* RoBERTa (and XLM-R / CamemBERT) numbers real tokens from ``pad_token_id + 1`` and gives
  padding the position ``pad_token_id`` (fairseq's ``make_positions``), computed from the
  token ids, not the attention mask. Its table therefore has ``pad_token_id + 1`` more
  rows than the longest text (514 for 512 tokens).

LayerNorm eps (BERT 1e-12, RoBERTa 1e-5), activation and sizes come from the config.
"""

from __future__ import annotations

import os
import re
from typing import Any

from torch import Tensor, nn

from trim.errors import CheckpointError, ConfigError
from trim.models.config import TextConfig
from trim.models.convert.common import transformers_activation

BERT_LIKE = ("bert",)
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")

# transformers BertModel / RobertaModel parameter -> trim TextTower parameter
KEYS = [
    (r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight", r"embeddings.\1.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"stack.blocks.\1.attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"stack.blocks.\1.attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"stack.blocks.\1.attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"stack.blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"stack.blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"stack.blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"stack.blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"stack.blocks.\1.norm2.\2"),
]
DROPPED = (r"pooler\..*", r"embeddings\.position_ids", r"embeddings\.token_type_ids")


def load_transformers_encoder(name_or_dir: str | os.PathLike) -> nn.Module:
    """``AutoModel.from_pretrained(name_or_dir)``: the bare encoder (task heads are not loaded)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(name_or_dir)).eval()
    except OSError as err:
        raise CheckpointError(f"cannot load text encoder {str(name_or_dir)!r} with transformers ({err}). "
                              f"Offline, pass a local directory (save_pretrained output)") from err


def text_config_from_transformers(config: Any) -> TextConfig:
    """A transformers BertConfig / RobertaConfig -> trim `TextConfig`, refusing what trim cannot run."""
    kind = config.model_type
    where = f"transformers {kind} config"
    if kind not in BERT_LIKE + ROBERTA_LIKE:
        raise ConfigError(f"{where}: trim's text tower converts {BERT_LIKE + ROBERTA_LIKE} encoders, "
                          f"not {kind!r}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ConfigError(f"{where}: is_decoder / add_cross_attention is set; trim converts the bidirectional "
                          f"encoder only")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ConfigError(f"{where}: position_embedding_type={position_type!r}; trim supports 'absolute' only")
    act = transformers_activation(config.hidden_act, f"{where}: hidden_act")
    width, hidden = config.hidden_size, config.intermediate_size
    ratio = hidden / width
    if int(width * ratio) != hidden:
        ratio = (hidden + 0.5) / width
    return TextConfig(
        vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, width=width, layers=config.num_hidden_layers,
        heads=config.num_attention_heads, mlp_ratio=ratio, act=act,
        eps=float(config.layer_norm_eps), pad_token_id=int(config.pad_token_id or 0),
        roberta_positions=kind in ROBERTA_LIKE)


def text_state_from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a BertModel / RobertaModel state dict to `TextTower`'s names (pooler dropped)."""
    out = {}
    for key, value in state.items():
        for pattern, target in KEYS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value.detach().clone()
                break
        else:
            if not any(re.fullmatch(p, key) for p in DROPPED):
                raise ConfigError(f"transformers parameter {key!r} has no place in trim's TextTower; "
                                  f"an unsupported encoder variant?")
    return out


def text_tower_from_transformers(name_or_dir: str | os.PathLike | nn.Module) -> tuple[TextConfig, dict[str, Tensor]]:
    """A BERT / RoBERTa checkpoint (name, directory, or a loaded model) -> `TextTower` config and state dict."""
    model = name_or_dir if isinstance(name_or_dir, nn.Module) else load_transformers_encoder(name_or_dir)
    model = getattr(model, "base_model", model)  # e.g. RobertaForMaskedLM -> its RobertaModel
    cfg = text_config_from_transformers(model.config)
    return cfg, text_state_from_transformers(model.state_dict())
