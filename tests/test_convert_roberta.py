"""transformers BERT / RoBERTa -> trim's TextTower: off = original (invariant 2).

Tiny random encoders are saved with ``save_pretrained`` and converted from the directory,
the path a user takes with a hub name; nothing is downloaded.
"""

import pytest
import torch
import transformers

from trim.errors import ConfigError
from trim.models.config import TrimConfig
from trim.models.convert.roberta import text_config_from_transformers, text_tower_from_transformers
from trim.models.towers import TextTower, text_protect
from trim.prune import start_tokens

SIZES = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
CASES = {  # name -> (transformers class, config overrides)
    "bert": ("BertModel", dict(max_position_embeddings=24, pad_token_id=0)),
    "bert-gelu_new": ("BertModel", dict(max_position_embeddings=24, pad_token_id=0, hidden_act="gelu_new",
                                        layer_norm_eps=1e-6)),
    "roberta": ("RobertaModel", dict(max_position_embeddings=26, pad_token_id=1, type_vocab_size=1,
                                     layer_norm_eps=1e-5)),
    "roberta-mlm": ("RobertaForMaskedLM", dict(max_position_embeddings=26, pad_token_id=1, type_vocab_size=1,
                                               layer_norm_eps=1e-5)),
}


def save_encoder(case: str, directory) -> torch.nn.Module:
    cls_name, overrides = CASES[case]
    config_cls = transformers.BertConfig if cls_name.startswith("Bert") else transformers.RobertaConfig
    model = getattr(transformers, cls_name)(config_cls(**SIZES, **overrides)).eval()
    with torch.no_grad():  # off the init (unit norms, zero biases) so a swapped or dropped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model if cls_name.endswith("Model") else model.base_model


def text_batch(pad: int, b: int = 3, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (b, n))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_off_reproduces_transformers_last_hidden_state(case, tmp_path):
    hf = save_encoder(case, tmp_path)
    cfg, state = text_tower_from_transformers(tmp_path)
    assert cfg.roberta_positions == case.startswith("roberta")
    tower = TextTower(cfg, TrimConfig())
    tower.load_state_dict(state)  # strict: every TextTower parameter comes from the checkpoint
    ids, mask = text_batch(cfg.pad_token_id)
    types = None
    if cfg.type_vocab_size > 1:  # a sentence pair: the second segment's type embeddings are used too
        types = torch.zeros_like(ids)
        types[:, 4:] = 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        tokens = start_tokens(tower.embeddings(ids, types), "off", valid=mask.bool(), protect=text_protect(mask))
        out = tower.stack(tokens, mode="off").x
    valid = mask.bool()  # padding is never attended to; its own outputs are not compared
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_unsupported_encoders_are_refused():
    with pytest.raises(ConfigError, match="is_decoder"):
        text_config_from_transformers(transformers.BertConfig(**SIZES, is_decoder=True))
    with pytest.raises(ConfigError, match="hidden_act"):
        text_config_from_transformers(transformers.BertConfig(**SIZES, hidden_act="silu"))
    with pytest.raises(ConfigError, match="converts"):
        text_config_from_transformers(transformers.GPT2Config())
