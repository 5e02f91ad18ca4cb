"""transformers ViLT -> trim: off = original (invariant 2), and the converted model trims correctly.

Tiny random ViLTs are saved with ``save_pretrained`` and loaded back through the user path,
``trim.models.from_pretrained(directory)``; nothing is downloaded.
"""

import pytest
import torch
import transformers

from trim.errors import CheckpointError, ConfigError
from trim.models import from_pretrained, save_model
from trim.prune import HeadTrimmer, TokenTrimmer

IMAGES = 2
TRIM = {"vision_token_layers": [1], "vision_head_layers": [0]}


def hf_config(**overrides) -> transformers.ViltConfig:
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8, vocab_size=100, max_position_embeddings=16, pad_token_id=0,
              attn_implementation="eager")
    return transformers.ViltConfig(**{**kw, **overrides})


def save_hf(cls_name: str, directory, **overrides) -> torch.nn.Module:
    if cls_name == "ViltForQuestionAnswering":
        overrides = {"num_labels": 5, **overrides}
    if cls_name == "ViltForImagesAndTextClassification":
        overrides = {"num_images": IMAGES, "modality_type_vocab_size": IMAGES + 1, **overrides}
    model = getattr(transformers, cls_name)(hf_config(**overrides)).eval()
    with torch.no_grad():  # off the init (zero biases, unit norms, zero cls / positions) so a swap would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def batch(images: int | None = None, b: int = 3) -> dict:
    ids = torch.randint(1, 100, (b, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[2, 7:] = 0, 0
    ids[mask == 0] = 0
    shape = (b, 3, 32, 32) if images is None else (b, images, 3, 32, 32)
    return {"pixel_values": torch.randn(shape), "input_ids": ids, "attention_mask": mask}


def hf_inputs(data: dict) -> dict:
    return {k: data[k] for k in ("pixel_values", "input_ids", "attention_mask")}


CASES = {  # transformers class -> (images per sample, what to compare)
    "ViltForQuestionAnswering": (None, "logits"),
    "ViltForImagesAndTextClassification": (IMAGES, "logits"),
    "ViltForImageAndTextRetrieval": (None, "logits"),
    "ViltModel": (None, "pooler_output"),
    "ViltForMaskedLM": (None, "pooler_output"),
}


def reference(hf: torch.nn.Module, data: dict, what: str) -> torch.Tensor:
    with torch.no_grad():
        if what == "logits":
            return hf(**hf_inputs(data)).logits
        backbone = hf if isinstance(hf, transformers.ViltModel) else hf.vilt
        return backbone(**hf_inputs(data)).pooler_output


@pytest.mark.parametrize("cls_name", list(CASES))
def test_off_reproduces_transformers(cls_name, tmp_path):
    hf = save_hf(cls_name, tmp_path)
    images, what = CASES[cls_name]
    model = from_pretrained(str(tmp_path))
    data = batch(images)
    with torch.no_grad():
        out = model(data, trim="off")
    got = out.logits if what == "logits" else out.hidden
    torch.testing.assert_close(got, reference(hf, data, what), atol=1e-4, rtol=1e-4)


def test_task_and_head_follow_the_checkpoint(tmp_path):
    save_hf("ViltForImagesAndTextClassification", tmp_path / "nlvr2")
    save_hf("ViltModel", tmp_path / "bare", pad_token_id=None)  # transformers' default
    nlvr2, bare = from_pretrained(str(tmp_path / "nlvr2")), from_pretrained(str(tmp_path / "bare"))
    assert (nlvr2.config.task, nlvr2.config.max_images, nlvr2.config.num_labels) == ("nlvr2", IMAGES, 2)
    assert nlvr2.modality_embeddings.num_embeddings == IMAGES + 1
    assert bare.config.task == "vqa"  # a bare ViltModel gets a fresh VQA head by default
    assert bare.config.text.pad_token_id == 0


def test_converted_model_is_a_trim_checkpoint(tmp_path):
    """Once converted, the model saves and reloads as a trim model directory, no transformers needed."""
    save_hf("ViltForImagesAndTextClassification", tmp_path / "hf")
    model = from_pretrained(str(tmp_path / "hf"), trim=TRIM)
    save_model(model, tmp_path / "trim")
    again = from_pretrained(str(tmp_path / "trim"))
    assert again.config == model.config
    data = batch(IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(again(data, trim="eval").logits, model(data, trim="eval").logits)


def test_second_image_embedding_starts_from_the_first(tmp_path):
    """A backbone converted for NLVR2 encodes each image as transformers does with image type 1."""
    hf = save_hf("ViltModel", tmp_path)
    model = from_pretrained(str(tmp_path), task="nlvr2", num_labels=2)
    data = batch(IMAGES)
    with torch.no_grad():
        hidden = model(data, trim="off").hidden
        ref = [hf(**{**hf_inputs(data), "pixel_values": data["pixel_values"][:, k]}).pooler_output
               for k in range(IMAGES)]
    torch.testing.assert_close(hidden, torch.cat(ref, -1), atol=1e-4, rtol=1e-4)


def test_other_task_keeps_the_backbone_with_a_warning(tmp_path):
    hf = save_hf("ViltForQuestionAnswering", tmp_path)
    with pytest.warns(UserWarning, match="fresh head"):
        model = from_pretrained(str(tmp_path), num_labels=7)
    data = batch()
    with torch.no_grad():
        out = model(data, trim="off")
    assert out.logits.shape == (3, 7)
    torch.testing.assert_close(out.hidden, reference(hf, data, "pooler_output"), atol=1e-4, rtol=1e-4)


def randomise_trimmers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            torch.nn.init.normal_(m.out.weight, std=2.0)
            torch.nn.init.zeros_(m.out.bias)


@pytest.mark.parametrize("cls_name", ["ViltForQuestionAnswering", "ViltForImagesAndTextClassification"])
def test_trimmers_on_a_converted_model(cls_name, tmp_path):
    hf = save_hf(cls_name, tmp_path)
    images, _ = CASES[cls_name]
    model = from_pretrained(str(tmp_path), trim=TRIM)
    assert set(model.stack.token_trimmers) == {"1"} and set(model.stack.head_trimmers) == {"0"}
    data = batch(images)
    with torch.no_grad():
        off, ev = model(data, trim="off"), model(data, trim="eval")
        # trimmers take no part with trimming off, and fresh ones keep everything (invariant 3)
        torch.testing.assert_close(off.logits, reference(hf, data, "logits"), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ev.logits, off.logits, atol=1e-5, rtol=1e-5)
        randomise_trimmers(model)
        masked, ev = model(data, trim="masked"), model(data, trim="eval")
    torch.testing.assert_close(ev.logits, masked.logits, atol=1e-5, rtol=1e-5)  # invariant 1
    records = [layers for name, layers in masked.records.items()]
    full_tokens = off.records[next(iter(off.records))][1].tokens
    assert any(bool((r[1].tokens < full_tokens).any()) for r in records), "no token was pruned: vacuous check"
    assert any(bool((r[0].heads < 4).any()) for r in records), "no head was pruned: vacuous check"


def test_random_patch_subsets_are_refused(tmp_path):
    save_hf("ViltForQuestionAnswering", tmp_path, max_image_length=8)  # 16 patches, HF would sample 8
    with pytest.raises(ConfigError, match="max_image_length=8"):
        from_pretrained(str(tmp_path))


def test_unsupported_architecture_is_named(tmp_path):
    save_hf("ViltForTokenClassification", tmp_path)
    with pytest.raises(CheckpointError, match="ViltForTokenClassification"):
        from_pretrained(str(tmp_path))
