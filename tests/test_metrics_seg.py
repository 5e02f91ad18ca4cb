"""Prompted segmentation: the RITM clicker, IoU, COCO decoding and the full protocol."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from trim.eval.metrics.seg import Click, decode_rle, evaluate_prompted, mask_iou, next_click, size_bucket


def rect(shape, rows, cols):
    """Bool mask with rows r0..r1 and cols c0..c1 (inclusive) set."""
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


# --- the clicker -------------------------------------------------------------------------


def test_first_click_is_the_deepest_point_of_a_nonconvex_object():
    # A ring: its centroid (32, 32) is in the hole, outside the object.
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    ring = (r >= 10) & (r <= 20)
    click = next_click(np.zeros_like(ring), ring)
    assert click.is_positive and ring[click.y, click.x]
    depth = ndimage.distance_transform_edt(np.pad(ring, 1))[1:-1, 1:-1]
    assert depth[click.y, click.x] == depth.max()


def test_first_click_prefers_the_deep_part_over_a_long_thin_part():
    # A 10x10 square (rows 15..24, cols 20..29) plus a 40x6 strip along the left image edge.
    gt = rect((40, 40), (15, 24), (20, 29)) | rect((40, 40), (0, 39), (0, 5))
    # Square: depth 5 at rows 19/20, cols 24/25 (e.g. row 19: 19-14 = 5 to row 14, 25-19 = 6
    # to row 25); first in row-major order is (19, 24). The strip is 6 wide: depth 3 with the
    # image edge counted as background; without that zero border the corner (0, 0) would
    # look 6 deep and get the click.
    assert next_click(np.zeros_like(gt), gt) == Click(19, 24, True)


def test_false_negative_gives_a_positive_click():
    gt = rect((40, 40), (10, 29), (10, 29))  # 20x20
    pred = rect((40, 40), (10, 29), (10, 19))  # left half found; FN = rows 10..29 x cols 20..29
    # The FN region is 10 wide, so its depth is 5, at cols 24/25 (24-19 = 5, 30-24 = 6; the
    # found half counts as background) on every row >= 5 from its top and bottom (rows
    # 14..25, e.g. 14-9 = 5): the first maximum in row-major order is (14, 24).
    assert next_click(pred, gt) == Click(14, 24, True)


def test_false_positive_gives_a_negative_click():
    gt = rect((40, 40), (10, 19), (10, 19))  # 10x10, found exactly
    pred = gt | rect((40, 40), (25, 38), (20, 33))  # plus a 14x14 false blob, depth 7 at (31, 26)
    # rows 25..38: 31-24 = 7, 39-31 = 8; cols 20..33: 26-19 = 7, 34-26 = 8
    assert next_click(pred, gt) == Click(31, 26, False)


def test_clicked_pixels_are_not_chosen_again_and_exact_prediction_stops():
    gt = rect((40, 40), (15, 24), (20, 29))
    first = next_click(np.zeros_like(gt), gt)
    second = next_click(np.zeros_like(gt), gt, [first])
    # the other pixels at depth 5 follow in row-major order: (19, 25) after (19, 24)
    assert (first.y, first.x) == (19, 24) and (second.y, second.x) == (19, 25)
    assert next_click(gt, gt) is None


# --- IoU, buckets, decoding --------------------------------------------------------------


def test_mask_iou_known_masks():
    a = rect((20, 30), (0, 9), (0, 9))  # 100 px
    b = rect((20, 30), (0, 9), (5, 14))  # 100 px, shifted 5 columns
    assert mask_iou(a, b) == pytest.approx(50 / 150)  # overlap 10 x 5 = 50, union 200 - 50
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0  # both empty agree


def test_size_buckets_follow_coco():
    assert [size_bucket(a) for a in (1023, 1024, 9216, 9217)] == ["small", "medium", "medium", "large"]


def test_decode_rle_all_coco_forms():
    # uncompressed RLE is column-major starting with zeros: 1 zero, 2 ones, 9 zeros
    hand = decode_rle({"segmentation": {"size": [3, 4], "counts": [1, 2, 9]}})
    assert hand.tolist() == [[False] * 4, [True, False, False, False], [True, False, False, False]]
    mask = rect((20, 30), (3, 8), (4, 17))
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert np.array_equal(decode_rle({"segmentation": rle}), mask)  # counts as bytes
    as_json = {"size": rle["size"], "counts": rle["counts"].decode()}  # counts as str (COCO JSON)
    assert np.array_equal(decode_rle({"segmentation": as_json}), mask)
    # polygon of the square [10, 20) x [10, 20) in (x, y) order needs the image size
    poly = decode_rle({"segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]]}, height=32, width=32)
    assert poly.sum() == 100 and poly[10:20, 10:20].all()
    with pytest.raises(ValueError, match="height"):
        decode_rle({"segmentation": [[10, 10, 20, 10, 20, 20]]})


# --- the full protocol with a fake model -------------------------------------------------
# Image channel 0 holds the object, channel 1 a distractor. The fake model returns three
# masks with predicted IoUs (0.3, 0.9, 0.6); only the middle one is its real answer, so
# choosing by predicted IoU is exercised (the others are empty / everything).
# Real answer: box -> bright pixels (object or distractor) inside the box; clicks -> the
# object components under positive clicks, plus the distractor unless a negative click
# lies on it. Points come in (x, y) order.


def fake_predict(image, points, labels, box):
    obj, distractor = image[..., 0] > 127, image[..., 1] > 127
    if box is not None:
        x0, y0, x1, y1 = box.astype(int)
        answer = np.zeros_like(obj)
        answer[y0:y1, x0:x1] = (obj | distractor)[y0:y1, x0:x1]
    else:
        components, _ = ndimage.label(obj)
        answer = np.zeros_like(obj)
        for (x, y), label in zip(points.astype(int), labels):
            if label == 1 and obj[y, x]:
                answer |= components == components[y, x]
        if not any(distractor[y, x] for (x, y), label in zip(points.astype(int), labels) if label == 0):
            answer |= distractor
    masks = np.stack([np.zeros_like(obj), answer, np.ones_like(obj)])
    return masks, np.array([0.3, 0.9, 0.6])


def make_samples():
    shape = (64, 96)
    part_a = rect(shape, (4, 23), (6, 25))  # 20x20 = 400 px, depth 10, deepest first (13, 15)
    part_b = rect(shape, (40, 47), (70, 77))  # 8x8 = 64 px, depth 4, deepest first (43, 73)
    distractor = rect(shape, (40, 51), (4, 15))  # 12x12 = 144 px, depth 6, deepest first (45, 9)
    gt = part_a | part_b  # 464 px: small
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0] = gt * 255
    image[..., 1] = distractor * 255
    rle = mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))
    # a COCO annotation with the image added; bbox [x, y, w, h] of rows 4..47, cols 6..77
    coco_sample = {"image": image, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                   "bbox": [6, 4, 72, 44], "area": 464}

    medium = rect((64, 96), (10, 49), (10, 49))  # 40x40 = 1600 px
    large = rect((128, 128), (10, 109), (10, 109))  # 100x100 = 10000 px > 96^2
    plain = [{"image": np.stack([m * 255, 0 * m, 0 * m], -1).astype(np.uint8), "mask": m} for m in (medium, large)]
    return [coco_sample] + plain


def test_evaluate_prompted_hand_computed():
    res = evaluate_prompted(fake_predict, make_samples(), n_clicks=3)

    # box (6, 4, 78, 48) also takes the distractor's rows 40..47 x cols 6..15 = 80 px:
    # IoU = 464 / (464 + 80); the medium and large objects are found exactly.
    box_small = 464 / 544
    assert res["box"]["ious"] == pytest.approx([box_small, 1.0, 1.0])
    assert res["box"]["miou"] == pytest.approx((box_small + 2) / 3)
    assert (res["box"]["small"], res["box"]["medium"], res["box"]["large"]) == pytest.approx((box_small, 1.0, 1.0))
    assert (res["box"]["n_small"], res["box"]["n_medium"], res["box"]["n_large"]) == (1, 1, 1)

    # click 1: positive at A's deepest point (depth 10 > B's 4) -> A + distractor: 400 / 608
    # click 2: FN = B (depth 4) vs FP = distractor (depth 6) -> negative click -> A: 400 / 464
    # click 3: only B is left -> positive click -> A + B: exact
    per_click_small = [400 / 608, 400 / 464, 1.0]
    assert res["1click"]["ious"] == pytest.approx([per_click_small[0], 1.0, 1.0])
    assert res["1click"]["small"] == pytest.approx(400 / 608)
    assert res["nclick"]["ious"] == pytest.approx([1.0, 1.0, 1.0])
    assert res["nclick"]["n_clicks"] == 3
    assert res["nclick"]["miou_per_click"] == pytest.approx([(v + 2) / 3 for v in per_click_small])


def test_modes_are_independent_and_validated():
    samples = make_samples()[:1]
    only_one = evaluate_prompted(fake_predict, samples, modes=("1click",))
    assert set(only_one) == {"1click"} and only_one["1click"]["miou"] == pytest.approx(400 / 608)
    assert only_one["1click"]["medium"] is None and only_one["1click"]["n_medium"] == 0
    with pytest.raises(ValueError, match="unknown prompt mode"):
        evaluate_prompted(fake_predict, samples, modes=("3click",))
