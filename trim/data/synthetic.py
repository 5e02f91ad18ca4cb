"""The embedded synthetic "shapes" world: data that works with no download.

A scene is 3-6 (``World``) flat-coloured objects (6 shapes x 8 colours x 2 sizes) at random,
non-overlapping positions on a lightly textured grey background. Objects never touch,
so every object is fully visible and its instance mask is exactly the pixels painted in
its colour; a question about "the small triangle" therefore depends on the patches that
object covers and on nothing else.

Everything is a pure function of ``(seed, stream, split, index)``: scene ``i`` of a split
is the same scene in the VQA task (``image_id``) and in the segmentation task, which is
what lets tests check VQA answers against the segmentation masks.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
    "cyan": (50, 210, 220),
    "pink": (245, 140, 190),
}
# Object radius as a fraction of the image side: sizes stay distinct at any resolution.
SIZES: dict[str, float] = {"small": 0.085, "large": 0.15}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class World:
    """The knobs of the world: how crowded scenes are and how large objects are.

    ``size_scale`` multiplies both object radii; with 8-px patches at 64 px the default
    small objects span about 2x2 patches, ``size_scale=1.5`` about 3x3.
    """

    min_objects: int = 3
    max_objects: int = 6
    size_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"min_objects={self.min_objects}, max_objects={self.max_objects}: "
                             "need 1 <= min_objects <= max_objects")
        if not 0.25 <= self.size_scale <= 2.5:
            raise ValueError(f"size_scale={self.size_scale} is outside 0.25..2.5 (objects would vanish or not fit)")

    def radius(self, size: str, image_size: int) -> float:
        return SIZES[size] * self.size_scale * image_size

# Independent random streams, so adding questions never changes the scenes.
STREAM_SCENE, STREAM_VQA, STREAM_NLVR2 = 1, 2, 3


def rng_for(seed: int, stream: int, split: str, index: int) -> np.random.Generator:
    """The generator for one item; order-independent, so items can be made in any order."""
    return np.random.default_rng([seed, stream, SPLIT_CODES[split], index])


def image_id_for(split: str, index: int) -> int:
    """VQA-style integer image id, unique across splits."""
    return SPLIT_CODES[split] * 10_000_000 + index


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    r: float  # circumradius, pixels

    def matches(self, *, shape: str | None = None, color: str | None = None, size: str | None = None) -> bool:
        return (shape in (None, self.shape)) and (color in (None, self.color)) and (size in (None, self.size))


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[Obj, ...]
    background: int  # seed of the background texture

    def count(self, **attrs: str | None) -> int:
        return sum(o.matches(**attrs) for o in self.objects)

    def to_json(self) -> list[dict]:
        return [asdict(o) for o in self.objects]


# An object request: (shape, colour, size); None = drawn at random.
Spec = tuple[str | None, str | None, str | None]


def make_scene(rng: np.random.Generator, image_size: int, forced: list[Spec] | tuple[Spec, ...] = (),
               world: World = World()) -> Scene:  # fmt: skip
    """Random scene with ``forced`` objects placed first (used to plant NLVR2 statements)."""
    gap = max(1.0, image_size / 48)  # keep objects apart so masks never touch
    for _ in range(50):
        n = max(int(rng.integers(world.min_objects, world.max_objects + 1)), len(forced))
        specs = list(forced) + [(None, None, None)] * (n - len(forced))
        placed: list[Obj] = []
        for i, (shape, color, size) in enumerate(specs):
            shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
            color = color or list(COLORS)[int(rng.integers(len(COLORS)))]
            size = size or ("small", "large")[int(rng.integers(2))]
            r = world.radius(size, image_size)
            for _ in range(100):
                x, y = rng.uniform(r + gap, image_size - r - gap, size=2)
                if all(math.hypot(x - o.x, y - o.y) > r + o.r + gap for o in placed):
                    placed.append(Obj(shape, color, size, round(float(x), 2), round(float(y), 2), round(r, 2)))
                    break
            else:
                if i < len(forced):
                    break  # a forced object did not fit: start the scene again
        else:
            if len(placed) >= world.min_objects:
                return Scene(image_size, tuple(placed), int(rng.integers(2**31)))
    raise RuntimeError(f"could not place {len(forced)} forced objects in a {image_size}px image with {world}; "
                       "use a larger image, fewer objects or a smaller size_scale")


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, start_deg: float, radii: list[float]) -> list[tuple[float, float]]:
        pts = []
        for k in range(n):
            a = math.radians(start_deg + 360.0 * k / n)
            rr = radii[k % len(radii)]
            pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
        return pts

    if shape == "square":
        h = r * 0.8
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return ring(3, -90, [r])
    if shape == "diamond":
        return [(x, y - r), (x + 0.75 * r, y), (x, y + r), (x - 0.75 * r, y)]
    if shape == "star":
        return ring(10, -90, [r, 0.45 * r])
    if shape == "hexagon":
        return ring(6, 0, [r])
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def shape_mask(shape: str, x: float, y: float, r: float, image_size: int) -> np.ndarray:
    """Boolean (H, W) footprint of one shape; aliased on purpose so masks are exact."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        draw.polygon(_polygon(shape, x, y, r), fill=255)
    return np.asarray(canvas) > 0


def _background(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.background)
    s = scene.size
    base = rng.uniform(105, 150) + rng.uniform(-8, 8, size=3)
    # Low-frequency blotches (a coarse grid upsampled) plus fine grain: texture a model
    # has to learn to ignore, faint enough never to be mistaken for an object colour.
    coarse = Image.fromarray(rng.uniform(0, 255, size=(6, 6)).astype(np.uint8)).resize((s, s), Image.BILINEAR)
    blotches = (np.asarray(coarse, dtype=np.float32) / 255.0 - 0.5) * 24.0
    grain = rng.normal(0.0, 3.0, size=(s, s))
    return base[None, None, :] + (blotches + grain)[:, :, None]


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image (H, W, 3), bool instance masks (n_objects, H, W))."""
    image = _background(scene)
    masks = np.stack([shape_mask(o.shape, o.x, o.y, o.r, scene.size) for o in scene.objects])
    for obj, mask in zip(scene.objects, masks):
        image[mask] = COLORS[obj.color]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """PNG (lossless) or JPEG (quality 90) bytes of an RGB uint8 array."""
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    else:
        raise ValueError(f"image format {fmt!r} is not supported; use 'jpg' or 'png'")
    return buffer.getvalue()


def segmentation_record(scene: Scene, masks: np.ndarray, image_id: int, file_name: str) -> dict:
    """SA-1B annotation JSON of a rendered scene (one annotation per object, RLE masks)."""
    from pycocotools import mask as mask_utils

    s = scene.size
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    annotations = []
    for i, (obj, rle) in enumerate(zip(scene.objects, rles)):
        annotations.append(
            {
                "id": i,
                "segmentation": {"size": [s, s], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in boxes[i]],
                "area": int(areas[i]),
                "predicted_iou": 1.0,
                "stability_score": 1.0,
                "point_coords": [[obj.x, obj.y]],
                "crop_box": [0.0, 0.0, float(s), float(s)],
                # Not in SA-1B; kept so a mask can be traced back to the scene.
                "shape": obj.shape,
                "color": obj.color,
                "size": obj.size,
            }
        )
    return {"image": {"image_id": image_id, "width": s, "height": s, "file_name": file_name}, "annotations": annotations}
