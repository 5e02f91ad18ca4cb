"""Segmentation training and evaluation: SAM's loss terms, simulated prompts, batched decoding,
seg data (letterbox, corrupt masks), and `trim train` + `trim eval --task seg` end to end."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trim.data import build_loader, split_urls
from trim.data.stream import expand_urls
from trim.data.seg import deepest_points, letterbox_shape, rle_total
from trim.eval.metrics.seg import next_click
from trim.models import ModelConfig, create_model
from trim.train.seg_loss import (dice_loss, downsample_targets, focal_loss, iou_target, mask_losses, select_best,
                                 valid_mean)
from trim.train.seg_prompts import deepest_error_clicks, error_clicks, first_clicks, jitter_boxes

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes_seg_sam_tiny_full.yaml"
SIZE = 32


def square(size: int = 8, lo: int = 2, hi: int = 6) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[lo:hi, lo:hi] = 1
    return mask


# ----------------------------------------------------------------------------- loss terms


def test_dice_of_identical_masks_is_zero_and_of_disjoint_ones_nearly_one():
    mask = square()
    confident = (mask * 2 - 1) * 50  # sigmoid = the mask itself in float32
    assert dice_loss(confident, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.zeros(8, 8)
    other[7, 7] = 1
    # 2 |p t| = 0; |p| + |t| = 16 + 1; smooth 1 -> 1 - 1 / 18
    assert dice_loss(confident, other).item() == pytest.approx(1 - 1 / 18, abs=1e-6)


def test_focal_loss_known_values():
    zero = torch.zeros(1, 4, 4)
    # logit 0: p = 1/2, BCE = ln 2, (1 - p_t)^2 = 1/4; with alpha, alpha_t = 0.25 on the object, 0.75 off it
    assert focal_loss(zero, torch.ones(1, 4, 4)).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert focal_loss(zero, torch.ones(1, 4, 4), alpha=0.25).item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    assert focal_loss(zero, torch.zeros(1, 4, 4), alpha=0.25).item() == pytest.approx(0.75 * 0.25 * math.log(2), rel=1e-6)
    # a confident right answer costs almost nothing, a confident wrong one a lot
    assert focal_loss(torch.full((1, 4, 4), 8.0), torch.ones(1, 4, 4)).item() < 1e-6
    assert focal_loss(torch.full((1, 4, 4), -8.0), torch.ones(1, 4, 4)).item() > 1.0


def test_iou_target_is_the_iou_of_the_thresholded_prediction():
    target = torch.zeros(8, 8)
    target[0, :6] = 1  # 6 pixels
    logits = torch.full((8, 8), -3.0)
    logits[0, 4:8] = 3.0  # 4 pixels, 2 of them on the object
    assert iou_target(logits, target).item() == pytest.approx(2 / 8)
    assert iou_target(torch.full((8, 8), -1.0), torch.zeros(8, 8)).item() == 1.0, "both empty: a perfect answer"


def test_best_of_three_masks_and_the_iou_head_target():
    target = square()
    logits = torch.stack([torch.full((8, 8), -5.0), (target * 2 - 1) * 10, torch.full((8, 8), 5.0)])[None]
    iou_pred = torch.tensor([[0.0, 1.0, 0.25]])
    loss, iou_mse, parts = mask_losses(logits, iou_pred, target[None], focal_weight=20, dice_weight=1)
    assert loss.shape == (1, 3) and select_best(loss).item() == 1
    assert torch.allclose(parts["iou"], torch.tensor([[0.0, 1.0, 16 / 64]]))
    assert torch.allclose(iou_mse, torch.zeros(1, 3), atol=1e-6), "each predicted IoU was the actual one"


def test_targets_are_downsampled_as_covered_fractions_and_padding_is_left_out():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    mask[..., 0, 0] = 1
    mask[..., 2:, 2:] = 1
    assert torch.equal(downsample_targets(mask, (2, 2))[0, 0], torch.tensor([[0.25, 0.0], [0.0, 1.0]]))
    assert valid_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])).item() == 2.0


# ----------------------------------------------------------------------------- prompts


def random_masks(b: int = 3, k: int = 4, size: int = 16) -> torch.Tensor:
    masks = torch.zeros(b, k, size, size, dtype=torch.uint8)
    for i in range(b):
        for j in range(k):
            y, x = torch.randint(0, size - 4, (2,)).tolist()
            h, w = torch.randint(1, 5, (2,)).tolist()
            masks[i, j, y:y + h, x:x + w] = 1
    return masks


def test_first_click_lies_inside_its_mask():
    masks = random_masks()
    clicks = first_clicks(masks)
    assert clicks.shape == (3, 4, 1, 2)
    for (i, j), (x, y) in zip(np.ndindex(3, 4), clicks[..., 0, :].reshape(-1, 2).long().tolist()):
        assert masks[i, j, y, x] == 1


def test_error_clicks_are_labelled_by_the_side_of_the_error():
    gt = square(16, 4, 12)[None, None].repeat(1, 3, 1, 1).bool()
    pred = gt.clone()
    pred[0, 0, 4:12, 8:12] = False  # missed part of the object: a positive click there
    pred[0, 1, 0:2, 0:2] = True  # background taken: a negative click there
    points, labels = error_clicks(pred, gt)
    x, y = points[0, 0, 0].long().tolist()
    assert labels[0, 0, 0] == 1 and 8 <= x < 12 and 4 <= y < 12
    x, y = points[0, 1, 0].long().tolist()
    assert labels[0, 1, 0] == 0 and x < 2 and y < 2
    assert labels[0, 2, 0] == -1, "an exact prediction gets no click"


def test_deepest_refinement_clicks_are_the_evaluation_protocols_next_click():
    gt = random_masks(2, 3, 24).bool()
    pred = random_masks(2, 3, 24).bool()
    pred[1, 2] = gt[1, 2]  # exact: no click
    points, labels = deepest_error_clicks(pred, gt)
    for i, j in np.ndindex(2, 3):
        click = next_click(pred[i, j].numpy(), gt[i, j].numpy())
        if click is None:
            assert labels[i, j, 0] == -1
            continue
        assert points[i, j, 0].tolist() == [click.x, click.y] and labels[i, j, 0] == int(click.is_positive)
    assert labels[1, 2, 0] == -1


def test_boxes_keep_their_place_without_noise_and_stay_near_it_with():
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 12.0]]]).repeat(1, 500, 1)
    assert torch.equal(jitter_boxes(boxes, SIZE, noise=0.0, max_noise=5), boxes)
    moved = jitter_boxes(boxes, SIZE, noise=0.1, max_noise=2.0)
    assert (moved - boxes).abs().max() <= 2.0 + 1e-6 and (moved - boxes).abs().mean() > 0.3
    assert (moved[..., 2] >= moved[..., 0]).all() and moved.min() >= 0 and moved.max() <= SIZE


def test_deepest_point_is_the_evaluation_protocols_first_click():
    masks = random_masks(2, 3)
    points = deepest_points(masks).long()
    for (i, j), (x, y) in zip(np.ndindex(2, 3), points.reshape(-1, 2).tolist()):
        gt = masks[i, j].bool().numpy()
        click = next_click(np.zeros_like(gt), gt)
        assert (click.x, click.y, click.is_positive) == (x, y, True) and gt[y, x]


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory) -> Path:
    from trim.data import write_synthetic

    out = tmp_path_factory.mktemp("seg")
    write_synthetic(out, {"train": 48, "val": 8}, tasks=("seg",), image_size=SIZE, progress=False)
    return out


def test_training_batches_hold_padded_objects_whose_boxes_are_their_masks_boxes(seg_shards):
    loader = build_loader(split_urls(seg_shards, "seg", "train"), "seg", batch_size=4, mode="train", image_size=SIZE,
                          seg_objects=5, epoch_samples=8)  # fmt: skip
    batch = next(iter(loader))
    masks, boxes, valid = batch["object_masks"], batch["object_boxes"], batch["object_valid"]
    assert masks.shape == (4, 5, SIZE, SIZE) and boxes.shape == (4, 5, 4) and valid.any(1).all()
    for i, j in zip(*torch.nonzero(valid, as_tuple=True)):
        ys, xs = torch.nonzero(masks[i, j], as_tuple=True)
        assert boxes[i, j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert not masks[~valid].any(), "padding objects are empty"


def rle_record(masks: np.ndarray, height: int, width: int) -> dict:
    """An SA-1B record of ``masks`` (N, H, W) with their tight boxes and areas."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return {"image": {"image_id": 1, "width": width, "height": height},
            "annotations": [{"segmentation": {"size": [height, width], "counts": r["counts"].decode()},
                             "bbox": [float(v) for v in mask_utils.toBbox(r)], "area": float(mask_utils.area(r))}
                            for r in rles]}


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_the_mean():
    from PIL import Image

    from trim.data.decode import Collate, Decoder

    assert letterbox_shape(480, 640, 1024) == (768, 1024) and letterbox_shape(100, 50, 64) == (64, 32)
    image = np.zeros((20, 40, 3), np.uint8)
    image[6:10, 10:30] = 200
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    record = rle_record((image[..., 0] > 0)[None], 20, 40)
    sample = Decoder("seg", 16)({"__key__": "1", "png": png.getvalue(), "json": json.dumps(record)})
    assert sample["valid_size"] == (8, 16) and sample["masks"].shape == (1, 16, 16)
    assert sample["masks"][0, :8].sum() == 16 and not sample["masks"][0, 8:].any(), "mask resized with its image"
    assert torch.allclose(sample["boxes"][0], torch.tensor([4.0, 2.4, 12.0, 4.0])), "scaled by 16 / 40 on both axes"
    batch = Collate("seg", None, max_text_len=1, num_answers=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))([sample])
    assert (batch["pixel_values"][0, :, 8:] == 0).all() and (batch["pixel_values"][0, :, :8] != 0).any()


def corrupt_copy(src: Path, dst: Path, victim: int) -> None:
    """``src`` with the RLE counts of sample ``victim``'s first mask cut in half."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        members = [m for m in tin.getmembers() if m.isfile()]
        keys = sorted({m.name.split(".")[0] for m in members})
        for m in members:
            data = tin.extractfile(m).read()
            if m.name == f"{keys[victim]}.json":
                record = json.loads(data)
                counts = record["annotations"][0]["segmentation"]["counts"]
                record["annotations"][0]["segmentation"]["counts"] = counts[: len(counts) // 2]
                data = json.dumps(record).encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_a_corrupt_mask_is_skipped_and_counted(seg_shards, tmp_path):
    shard = tmp_path / "val-000000.tar"
    (source,) = expand_urls(split_urls(seg_shards, "seg", "val"))
    corrupt_copy(Path(source), shard, victim=2)
    loader = build_loader(str(shard), "seg", batch_size=4, mode="eval", image_size=SIZE)
    ids = [i for batch in loader for i in batch["image_id"]]
    assert len(ids) == 7 and loader.stats.skipped == {"bad_mask": 1}
    counts = rle_record(square(SIZE).numpy()[None], SIZE, SIZE)["annotations"][0]["segmentation"]["counts"]
    assert rle_total(counts) == SIZE * SIZE and rle_total(counts[:-1]) != SIZE * SIZE
    assert rle_total("\x7f") is None and rle_total([3, -1]) is None


# ----------------------------------------------------------------------------- model


def test_batched_decoding_equals_segment_anythings_per_image_calls():
    model = create_model(ModelConfig.from_dict({"family": "sam", "task": "seg"})).eval()
    emb = torch.randn(3, 32, 8, 8)
    boxes = torch.rand(3, 2, 4) * 32
    boxes[..., 2:] += boxes[..., :2]
    points, labels = torch.rand(3, 2, 3, 2) * 64, torch.randint(0, 2, (3, 2, 3))
    with torch.no_grad():
        for multimask in (False, True):
            got = model.predict(emb, boxes=boxes, points=points, point_labels=labels, multimask_output=multimask)
            for i in range(3):
                sparse, dense = model.prompt_encoder(points=(points[i], labels[i]), boxes=boxes[i], masks=None)
                masks, iou = model.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=model.prompt_encoder.get_dense_pe(),
                                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                multimask_output=multimask)  # fmt: skip
                assert torch.allclose(got.masks[i], masks, atol=1e-5) and torch.allclose(got.iou[i], iou, atol=1e-5)


def seg_batch(b: int = 2, k: int = 3) -> dict:
    masks = random_masks(b, k, 64)
    ys = [torch.nonzero(m, as_tuple=True) for m in masks.flatten(0, 1)]
    boxes = torch.tensor([[x.min(), y.min(), x.max() + 1, y.max() + 1] for y, x in ys], dtype=torch.float32)
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[-1, -1] = False
    masks[~valid] = 0
    return {"pixel_values": torch.randn(b, 3, 64, 64), "object_masks": masks, "object_boxes": boxes.view(b, k, 4),
            "object_valid": valid}


def seg_objective(**seg):
    from trim.config import load_recipe
    from trim.train.objectives import build_objective

    recipe = load_recipe(RECIPE, [f"objective.seg.{k}={v}" for k, v in seg.items()])
    return build_objective(recipe.objective, "seg"), recipe


def test_the_seg_objective_trains_the_full_model_without_trimming():
    objective, recipe = seg_objective(click_rounds=2)
    model = create_model(recipe.model.config)
    result = objective(model, seg_batch(), 0)
    result.loss.backward()
    terms = result.terms
    assert math.isfinite(result.loss.item()) and terms["loss/mask"] > 0
    assert {"train_miou/box", "train_miou/click", "train_miou/click2", "train_miou/click3"} <= set(terms)
    assert "loss/cost" not in terms and "loss/distill" not in terms
    assert model.image_encoder.patch_embed.weight.grad.abs().sum() > 0, "the masks' loss reaches the encoder"


@pytest.mark.parametrize("prompt_aware", [False, True])
def test_cost_and_distillation_join_when_the_encoder_trims(prompt_aware):
    objective, recipe = seg_objective()
    cfg = recipe.model.config
    cfg.sam.trim.token_layers, cfg.sam.trim.prompt_aware = [2], prompt_aware
    model = create_model(cfg.validate())
    with torch.no_grad():  # trimmers that start by dropping tokens, so student and teacher differ
        for trimmer in model.image_encoder.token_trimmers.values():
            for param in trimmer.parameters():
                param.normal_()
    result = objective(model, seg_batch(), 0)
    result.loss.backward()
    terms = result.terms
    assert terms["cost_ratio"] < 1 and terms["loss/cost"] == pytest.approx((terms["cost_ratio"] - objective.target(0)) ** 2)
    assert terms["loss/distill"] > 0 and terms["tau"] == objective.tau(0)
    trimmer = next(iter(model.image_encoder.token_trimmers.values()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trimmer.parameters()), "the trimmers learn"


def test_prompt_aware_trimming_pays_for_every_prompt_round(monkeypatch):
    """Each click round re-encodes the image for its prompts; the budget covers all those passes."""
    import trim.models.sam_prompts as sam_prompts

    objective, recipe = seg_objective(click_rounds=1)
    cfg = recipe.model.config
    cfg.sam.trim.token_layers, cfg.sam.trim.prompt_aware = [2], True
    model = create_model(cfg.validate())
    costs = []
    original = sam_prompts.prompt_round

    def recording_round(*args, **kwargs):
        result = original(*args, **kwargs)
        costs.append(float(result.cost_ratio.detach().float().mean()))
        return result

    monkeypatch.setattr(sam_prompts, "prompt_round", recording_round)
    box_costs = []
    forward = type(model).forward

    def recording_forward(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        if kwargs.get("boxes") is not None:
            box_costs.append(float(result.cost_ratio.detach().float().mean()))
        return result

    monkeypatch.setattr(type(model), "forward", recording_forward)
    with torch.no_grad():  # click prompts keep more than box prompts: the two costs differ
        for trimmer in model.image_encoder.token_trimmers.values():
            for param in trimmer.parameters():
                param.normal_()
    terms = objective(model, seg_batch(), 0).terms
    assert len(box_costs) == 1 and len(costs) == 2  # one box pass, the first click and one refinement
    assert terms["cost_ratio"] == pytest.approx((box_costs[0] + sum(costs)) / 3, rel=1e-5)


# ----------------------------------------------------------------------------- end to end


def test_train_then_eval_seg_end_to_end(seg_shards, tmp_path, capsys, one_thread):
    from trim.eval.cli import main as eval_main
    from trim.train.cli import main as train_main

    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"]["sam"]["encoder"].update(image_size=SIZE, width=32, depth=2, global_attn_indexes=[1], window_size=2)
    raw["data"].update(root=str(seg_shards), image_size=SIZE, batch_size=4, num_workers=0, shuffle_buffer=16)
    raw["train"].update(steps=6, save_every=3, eval_every=3, log_every=1, progress=False)
    raw["output_dir"] = str(tmp_path / "runs")
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert train_main([str(recipe)]) == 0
    run = tmp_path / "runs" / raw["name"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and all(0 <= e["box_miou"] <= 1 for e in evals)
    assert "val box mIoU" in capsys.readouterr().out
    train_losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["kind"] == "train"]
    assert all(math.isfinite(v) for v in train_losses) and len(train_losses) == 6

    assert eval_main([str(run), "--task", "seg", "--data", str(seg_shards), "--batch-size", "4", "--clicks", "3",
                      "--warmup", "0", "--repeats", "1", "--figures", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "box mIoU" in printed and "1-click mIoU" in printed and "3-click mIoU" in printed
    result = json.loads((run / "step_6" / "eval" / "seg.json").read_text())
    assert result["samples"] == 8 and result["complete"] and result["objects"] >= 8 * 3
    for mode in ("box", "1click", "nclick"):
        m = result["metrics"][mode]
        assert 0 <= m["miou"] <= 1 and m["n"] == result["objects"]
        assert m["n_small"] + m["n_medium"] + m["n_large"] == m["n"]
    assert len(result["metrics"]["nclick"]["miou_per_click"]) == 3
    assert result["metrics"]["nclick"]["miou_per_click"][0] == pytest.approx(result["metrics"]["1click"]["miou"])
    assert result["cost_ratio"]["mean"] == 1.0 and result["speed"]["batch8"]["batch_size"] == 8
    assert result["speed"]["batch1"]["full_ms"] > 0 and not result["speed"]["trimmed"]
    assert (run / "step_6" / "eval" / result["figures"][0]).stat().st_size > 0


def test_a_segment_anything_checkpoint_is_a_starting_point(seg_shards, tmp_path, capsys, one_thread):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
    from segment_anything.modeling import Sam as OfficialSam

    from trim.models import load_model
    from trim.train.cli import main as train_main

    grid = SIZE // 4
    encoder = ImageEncoderViT(img_size=SIZE, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                              out_chans=32, window_size=4, global_attn_indexes=(1,), use_rel_pos=True,
                              norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))  # fmt: skip
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(grid, grid), input_image_size=(SIZE, SIZE),
                           mask_in_chans=8)  # fmt: skip
    decoder = MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=2, embedding_dim=32, num_heads=8,
                                                                            mlp_dim=48), iou_head_hidden_dim=24)
    official = OfficialSam(encoder, prompt, decoder)
    with torch.no_grad():
        official.image_encoder.patch_embed.proj.weight.normal_()
    torch.save(official.state_dict(), tmp_path / "sam_tiny.pth")

    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"] = {"pretrained": str(tmp_path / "sam_tiny.pth"), "family": "sam", "task": "seg", "sam": {
        "encoder": {"image_size": SIZE, "patch_size": 4, "width": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0,
                    "window_size": 4, "global_attn_indexes": [1], "out_chans": 32},
        "decoder": {"mask_in_chans": 8, "depth": 2, "heads": 8, "mlp_dim": 48, "iou_head_hidden_dim": 24}}}
    raw["data"].update(root=str(seg_shards), image_size=SIZE, batch_size=2, num_workers=0, shuffle_buffer=4)
    raw["train"].update(steps=1, lr=1e-12, warmup=0, eval_every=0, eval_at_end=False, progress=False)
    raw["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "sam.yaml").write_text(yaml.safe_dump(raw))
    assert train_main([str(tmp_path / "sam.yaml")]) == 0
    trained = load_model(tmp_path / "runs" / raw["name"])
    assert torch.allclose(trained.image_encoder.patch_embed.weight, official.image_encoder.patch_embed.proj.weight,
                          atol=1e-6), "training started from the checkpoint's weights"

    raw["model"]["sam"]["encoder"]["width"] = 64
    (tmp_path / "sam.yaml").write_text(yaml.safe_dump({**raw, "name": "other"}))
    capsys.readouterr()
    assert train_main([str(tmp_path / "sam.yaml")]) == 2, "a recipe that misdescribes the checkpoint is refused"
    err = capsys.readouterr().err
    assert "converts to a different architecture" in err and "sam.encoder.width" in err


@pytest.mark.parametrize("prompt_aware", [False, True])
def test_eval_of_a_trimming_encoder_times_full_against_trimmed(seg_shards, tmp_path, capsys, one_thread,
                                                               prompt_aware):
    from trim.eval.cli import main as eval_main
    from trim.models import save_model

    cfg = ModelConfig.from_dict({"family": "sam", "task": "seg", "sam": {
        "encoder": {"image_size": SIZE, "patch_size": 4, "width": 32, "depth": 3, "window_size": 4,
                    "global_attn_indexes": [2]},
        "trim": {"token_layers": [1], "token_keep": 0.5, "prompt_aware": prompt_aware}}})
    save_model(create_model(cfg), tmp_path / "trimmed")
    assert eval_main([str(tmp_path / "trimmed"), "--task", "seg", "--data", str(seg_shards), "--max-samples", "3",
                      "--clicks", "2", "--warmup", "0", "--repeats", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "trimmed" / "eval" / "seg.json").read_text())
    assert result["samples"] == 3 and not result["complete"]
    assert 0 < result["cost_ratio"]["mean"] < 0.9, "the trimmers keep half of each window's tokens"
    assert result["speed"]["trimmed"] and result["speed"]["batch1"]["speedup"] > 0
    assert "encoder speed batch 1: trimmed" in printed and "batch 3: trimmed" in printed, "8 asked, 3 read"


def test_sam_trimmers_and_routers_get_the_trimmer_learning_rate():
    from trim.train.trainer import param_groups

    cfg = ModelConfig.from_dict({"family": "sam", "task": "seg", "sam": {"trim": {"token_layers": [1],
                                                                                  "route_layers": [2]}}})
    model = create_model(cfg)
    groups = param_groups(model, lr=1e-4, trimmer_lr=1e-2, weight_decay=0.0)
    fast = {id(p) for g in groups if g["lr"] == 1e-2 for p in g["params"]}
    trimmers = [*model.image_encoder.token_trimmers.parameters(), *model.image_encoder.routers.parameters()]
    assert trimmers and fast == {id(p) for p in trimmers}


def test_a_resumed_seg_run_trains_what_the_uninterrupted_one_did(seg_shards, tmp_path, one_thread):
    import shutil

    from safetensors.torch import load_file

    from trim.train.cli import main as train_main

    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"]["sam"]["encoder"].update(image_size=SIZE, width=32, depth=2, global_attn_indexes=[1], window_size=2)
    raw["data"].update(root=str(seg_shards), image_size=SIZE, batch_size=4, num_workers=0, shuffle_buffer=16)
    raw["train"].update(steps=4, save_every=2, eval_every=0, eval_at_end=False, progress=False)
    raw["output_dir"] = str(tmp_path / "runs")
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert train_main([str(recipe)]) == 0
    run = tmp_path / "runs" / raw["name"]
    uninterrupted = load_file(str(run / "step_4" / "model.safetensors"))
    shutil.rmtree(run / "step_4")  # as if the run had died after step 3
    (run / "latest").write_text("step_2\n")
    assert train_main([str(recipe), "train.resume=latest"]) == 0
    resumed = load_file(str(run / "step_4" / "model.safetensors"))
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items()), \
        "same objects, prompts and noise after resuming"


def test_routers_added_by_init_from_start_from_their_blocks(seg_shards, tmp_path, one_thread):
    from trim.models import load_model, save_model
    from trim.train.cli import main as train_main

    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"]["sam"]["encoder"].update(image_size=SIZE, width=32, depth=2, global_attn_indexes=[1], window_size=2)
    plain = create_model(ModelConfig.from_dict({k: v for k, v in raw["model"].items()}))
    with torch.no_grad():
        plain.image_encoder.blocks[1].norm1.weight.normal_()
    save_model(plain, tmp_path / "plain")
    raw["model"] = {"init_from": str(tmp_path / "plain"), "sam": {"trim": {"route_layers": [1]}}}
    raw["data"].update(root=str(seg_shards), image_size=SIZE, batch_size=2, num_workers=0, shuffle_buffer=4)
    raw["train"].update(steps=1, lr=1e-12, trimmer_lr=1e-12, warmup=0, eval_every=0, eval_at_end=False,
                        progress=False)
    raw["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "routed.yaml").write_text(yaml.safe_dump(raw))
    assert train_main([str(tmp_path / "routed.yaml")]) == 0
    routed = load_model(tmp_path / "runs" / raw["name"])
    little = routed.image_encoder.routers["1"].little
    assert torch.allclose(little.norm1.weight, plain.image_encoder.blocks[1].norm1.weight, atol=1e-6), \
        "the E-block was built from the trained P-block"
