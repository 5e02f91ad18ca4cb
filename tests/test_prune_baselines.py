"""The pruning baselines (trim.prune.policies): each prunes to its budget and decides as its method says."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trim.errors import ConfigError
from trim.models import ModelConfig, create_model
from trim.nn import PreNormBlock, TokenSet
from trim.prune import RATIO_POLICIES, TokenTrimmer
from trim.prune.calibrate import CalibrationError, calibrate
from trim.prune.cost import first_token_attention_flops
from trim.prune.evit import EvitTrimmer
from trim.prune.keep_ratio import fit_keep_ratio, keep_count, set_keep_ratio
from trim.prune.static_heads import StaticHeadGate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only spin-waits

TARGET = 0.55
TOLERANCE = 0.03  # a fixed ratio meets the target up to one token's worth of cost


def tiny(policy: str, **trim) -> torch.nn.Module:
    layers = {"vision_token_layers": [1], "cross_token_layers": [0, 1], "cross_head_layers": [0, 1]}
    cfg = ModelConfig.from_dict({
        "family": "dual", "task": "vqa", "num_labels": 5,
        "vision": {"image_size": 32, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
        "text": {"vocab_size": 64, "width": 32, "layers": 1, "heads": 2},
        "cross_layers": 2, "cross_width": 32, "cross_heads": 2, "trim": {**layers, **trim, "policy": policy}})
    return create_model(cfg).eval()


def batch(b: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (b, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0  # every other question shorter: padding in the batch
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids * mask, "attention_mask": mask}


def spread_logits(model: torch.nn.Module) -> None:
    """Learned trimmers past their keep-all start, so their decisions depend on the input."""
    for m in model.modules():
        if isinstance(m, TokenTrimmer) or hasattr(m, "out"):
            torch.nn.init.normal_(m.out.weight, std=1.0)
            torch.nn.init.zeros_(m.out.bias)
        if isinstance(m, StaticHeadGate):
            m.gate.data = torch.tensor([1.0, -1.0])


def rows_into(block: torch.nn.Module, seen: list[int]):
    """Count the token rows a block physically runs on (packed: (1, T, D); padded: valid slots)."""
    def hook(module, args, kwargs):
        x, keep = args[0], kwargs.get("keep")
        seen.append(int(keep.sum()) if keep is not None else x.shape[0] * x.shape[1])
    return block.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("policy", RATIO_POLICIES)
def test_fixed_ratio_baselines_prune_to_their_budget(policy):
    model = tiny(policy)
    schedule = fit_keep_ratio(model, batch(), TARGET)
    set_keep_ratio(model, schedule.final_ratio)
    other = batch(seed=1)  # held-out inputs: the ratio depends on shapes, not on the fitting batch
    with torch.no_grad():
        for layout in ("packed", "padded"):
            out = model(other, trim="eval", layout=layout)
            assert float(out.cost_ratio.mean()) == pytest.approx(TARGET, abs=TOLERANCE + (0.03 if layout == "padded" else 0))
        masked = model(other, trim="masked")
        torch.testing.assert_close(masked.logits, out.logits, atol=1e-5, rtol=0)  # invariant 1
        seen: list[int] = []
        handle = rows_into(model.image_layers[1], seen)
        model(other, trim="eval", layout="packed")
        model(other, trim="off")
        handle.remove()
    trimmed, full = seen
    assert trimmed < 0.7 * full, f"{policy}: the cross image layer 1 ran {trimmed} of {full} token rows"


@pytest.mark.parametrize("policy", ["smarttrim", "text_agnostic", "static_heads"])
def test_learned_baselines_calibrate_to_their_budget(policy):
    model = tiny(policy)
    spread_logits(model)
    inputs = [batch(seed=s) for s in range(2)]
    cal = calibrate(model, inputs, TARGET)
    assert cal.mean_cost == pytest.approx(TARGET, abs=0.01)
    with torch.no_grad():
        cost = torch.cat([model(b, trim="eval").sample_cost for b in inputs])  # what each sample kept
    assert float(cost.mean()) == pytest.approx(TARGET, abs=0.01)


def test_random_keeps_different_tokens_per_sample_and_repeats_at_eval():
    model = tiny("random")
    set_keep_ratio(model, 0.5)
    same_image = batch()
    same_image["pixel_values"][:] = same_image["pixel_values"][0]

    def kept(mode: str) -> torch.Tensor:
        with torch.no_grad():
            return model(same_image, trim=mode, track_alive=True).records["vision"][1].alive

    first = kept("eval")
    assert first.sum(1).eq(first[0].sum()).all() and first[0].sum() < first.shape[1]
    assert not (first == first[0]).all(), "every sample kept the same tokens"
    assert torch.equal(first, kept("eval")) and torch.equal(first, kept("masked"))  # fixed seed
    assert not torch.equal(kept("train"), kept("train")), "training draws a fresh subset every step"


def test_evit_keeps_the_top_k_by_cls_attention_and_fuses_the_rest():
    d, n = 8, 6
    block = PreNormBlock(d, 2)
    attention = torch.tensor([[0.30, 0.05, 0.25, 0.10, 0.20, 0.10],
                              [0.40, 0.30, 0.02, 0.08, 0.05, 0.15]])
    block.attn.first_token_attention = lambda x, keep: attention  # a hand-made [CLS] attention map
    trimmer = EvitTrimmer()
    set_keep_ratio(trimmer, 0.4)  # ceil(0.4 * 5) = 2 of the 5 prunable tokens
    x = torch.randn(2, n, d)
    protect = torch.zeros(2, n, dtype=torch.bool)
    protect[:, 0] = True
    for physical in (False, True):
        out = trimmer(TokenSet.start(x, protect=protect, physical=physical, soft=False), block)
        keep = out.keep.bool()
        if physical:
            assert out.index[keep].view(2, -1)[:, :3].tolist() == [[0, 2, 4], [0, 1, 5]]
            fused = out.x[:, 3]
        else:
            assert keep[:, :n].tolist() == [[True, False, True, False, True, False],
                                             [True, True, False, False, False, True]]
            fused = out.x[:, n]
        assert keep.sum(1).tolist() == [4, 4]  # CLS + 2 kept + the fused token
        for row, dropped in ((0, [1, 3, 5]), (1, [2, 3, 4])):
            w = attention[row, dropped]
            torch.testing.assert_close(fused[row], (w[:, None] * x[row, dropped]).sum(0) / w.sum())


def test_evit_reads_the_blocks_own_cls_attention_and_counts_its_flops():
    d, n, h = 16, 9, 4
    block = PreNormBlock(d, h)
    x = torch.randn(1, n, d)
    a = block.attn
    q, k, _ = (t.view(1, n, h, d // h).transpose(1, 2) for t in a.qkv(block.norm1(x)).chunk(3, -1))
    expected = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)[:, :, 0].mean(1)
    torch.testing.assert_close(a.first_token_attention(block.norm1(x)), expected)
    trimmer = EvitTrimmer()
    set_keep_ratio(trimmer, 0.5)
    tokens = TokenSet.start(x, protect=torch.arange(n)[None] == 0, physical=True)
    with FlopCounterMode(display=False) as counter:
        trimmer(tokens, block)
    assert counter.get_total_flops() == pytest.approx(first_token_attention_flops(a, n), rel=0.02)


def test_text_agnostic_decisions_ignore_the_question():
    first = batch()
    questions = first, {**batch(seed=7), "pixel_values": first["pixel_values"]}  # same images, other questions
    for policy, ignores_text in (("text_agnostic", True), ("smarttrim", False)):
        torch.manual_seed(0)
        model = tiny(policy)
        spread_logits(model)
        for m in model.modules():  # a strong cross-modal term, where there is one
            if isinstance(m, TokenTrimmer) and m.cross is not None:
                m.cross.weight.data *= 20
        with torch.no_grad():
            outs = [model(q, trim="eval", track_alive=True).records for q in questions]
        # The vision tower and the first cross layer see the image only: their trimmers' own inputs
        # do not change with the question, so any change comes from the cross-modal term.
        for stream, layer in (("vision", 1), ("cross_image", 0)):
            same = torch.equal(outs[0][stream][layer].alive, outs[1][stream][layer].alive)
            assert same == ignores_text, f"{policy} {stream}[{layer}]"


def test_static_heads_run_one_head_set_for_every_input():
    model = tiny("static_heads")
    spread_logits(model)
    masks = []
    gate = model.cross_trimmers["image_self_heads"]["0"]
    handle = gate.register_forward_hook(lambda m, args, out: masks.append(out[0]))
    with torch.no_grad():
        for seed in range(2):
            model(batch(seed=seed), trim="eval")
    handle.remove()
    assert all(torch.equal(m, masks[0][:1].expand_as(m)) for m in masks)
    assert masks[0][0].tolist() == [1.0, 0.0]


def test_fixed_ratio_keeps_the_same_count_for_every_sample():
    model = tiny("fixed_ratio")
    spread_logits(model)
    set_keep_ratio(model, 0.4)
    with torch.no_grad():
        records = model(batch(), trim="eval").records
    for stream in ("vision", "cross_image"):
        for record in records[stream]:
            assert record.tokens.unique().numel() == 1 and record.heads.unique().numel() == 1
    assert records["cross_image"][0].heads[0] == 1  # ceil(0.4 * 2) heads
    # Counts follow k(n, r) = clamp(ceil(r n), min(min_keep, n), n).
    assert keep_count(torch.tensor([0, 1, 10, 64]), 0.3, 2).tolist() == [0, 1, 3, 20]


def test_fixed_ratio_methods_refuse_calibration_and_budgets():
    model = tiny("evit")
    with pytest.raises(CalibrationError, match="fixed ratio"):
        calibrate(model, [batch()], 0.5)
    with pytest.raises(CalibrationError, match="fixed ratio"):
        model(batch(), trim="eval", budget=0.5)


def test_invalid_combinations_are_rejected_before_work():
    with pytest.raises(ConfigError, match="model.trim.policy='evit' with model.bridge_layers"):
        ModelConfig.from_dict({"trim": {"policy": "evit", "cross_token_layers": [0]}, "bridge_layers": [0, 1],
                               "text": {"layers": 2}, "vision": {"layers": 2}})
    with pytest.raises(ConfigError, match="prunes tokens only"):
        ModelConfig.from_dict({"trim": {"policy": "random", "cross_head_layers": [0]}})
    with pytest.raises(ConfigError, match="replaces SmartTrim's head trimmers"):
        ModelConfig.from_dict({"trim": {"policy": "static_heads", "cross_token_layers": [0]}})
    with pytest.raises(ConfigError, match="model.trim.policy='dynamicvit'"):
        ModelConfig.from_dict({"trim": {"policy": "dynamicvit"}})
    from trim.models.clip_text import ClipTextConfig, ClipTextTower
    from trim.models.config import TrimConfig

    with pytest.raises(ConfigError, match="drop model.trim.text_token_layers"):
        ClipTextTower(ClipTextConfig(vocab_size=32, context_length=8, width=16, layers=1, heads=2),
                      TrimConfig(text_token_layers=[0], policy="evit"))
