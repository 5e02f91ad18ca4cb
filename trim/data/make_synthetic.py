"""Write the synthetic world as webdataset shards (``trim data synth``).

Sample layout inside the shards (the same as the converters write):

- vqa:   ``<question_id>.jpg`` + ``.json`` (VQA v2 question + annotation fields)
  + ``.relevance.png`` (the pixels of the objects the answer depends on; trim.data.relevance)
- nlvr2: ``<identifier>.left.jpg`` + ``.right.jpg`` + ``.json`` (identifier, sentence, label)
  + ``.left.relevance.png`` + ``.right.relevance.png``
- seg:   ``<image_id>.png`` + ``.json`` (SA-1B per-image annotation file); PNG because the
  masks must match the pixels exactly
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from trim.data.relevance import RELEVANCE_FILE, relevance_png
from trim.data.shards import ANSWERS_FILE, SPLITS, TASKS, ShardSink, update_manifest
from trim.data.synthetic import (
    STREAM_NLVR2,
    STREAM_SCENE,
    STREAM_VQA,
    World,
    encode_image,
    image_id_for,
    make_scene,
    render_scene,
    rng_for,
    segmentation_record,
)
from trim.data.synthetic_text import (
    annotator_answers,
    ask_questions,
    make_statement_set,
    text_vocabulary,
    vqa_answer_space,
)
from trim.data.tokenizer import build_tokenizer, save_tokenizer

PAIRS_PER_SET, SENTENCES_PER_SET = 4, 2


def _scene(seed: int, split: str, index: int, image_size: int, world: World):
    return make_scene(rng_for(seed, STREAM_SCENE, split, index), image_size, world=world)


def vqa_samples(seed: int, split: str, n: int, image_size: int, *, image_format: str = "jpg",
                questions_per_image: int = 3, world: World = World()) -> Iterator[dict]:  # fmt: skip
    """The first ``n`` VQA samples of a split, in order."""
    written = 0
    for index in itertools.count():
        scene = _scene(seed, split, index, image_size, world)
        image, masks = render_scene(scene)
        image_bytes = encode_image(image, image_format)
        image_id = image_id_for(split, index)
        rng = rng_for(seed, STREAM_VQA, split, index)
        for q_index, q in enumerate(ask_questions(rng, scene, questions_per_image)):
            if written == n:
                return
            question_id = image_id * 10 + q_index
            record = {
                "question_id": question_id,
                "image_id": image_id,
                "question": q.question,
                "question_type": q.question_type,
                "answer_type": q.answer_type,
                "multiple_choice_answer": q.answer,
                "answers": annotator_answers(rng, q),
                # Indices into the same image's segmentation annotations: the objects the
                # answer depends on (for analysing which patches a pruned model kept).
                "relevant_objects": list(q.relevant),
            }
            yield {"__key__": str(question_id), image_format: image_bytes, "json": json.dumps(record),
                   RELEVANCE_FILE: relevance_png(masks, q.relevant)}
            written += 1
        if written == n:
            return


def seg_samples(seed: int, split: str, n: int, image_size: int, *, world: World = World()) -> Iterator[dict]:
    """The first ``n`` segmentation samples of a split (scene ``i`` = VQA ``image_id`` i)."""
    for index in range(n):
        scene = _scene(seed, split, index, image_size, world)
        image, masks = render_scene(scene)
        image_id = image_id_for(split, index)
        record = segmentation_record(scene, masks, image_id, f"{image_id}.png")
        yield {"__key__": str(image_id), "png": encode_image(image, "png"), "json": json.dumps(record)}


def nlvr2_samples(seed: int, split: str, n: int, image_size: int, *, image_format: str = "jpg",
                  world: World = World()) -> Iterator[dict]:  # fmt: skip
    """The first ``n`` NLVR2 examples of a split, identifiers ``<split>-<set>-<pair>-<sentence>``."""
    written = 0
    for set_id in itertools.count():
        rng = rng_for(seed, STREAM_NLVR2, split, set_id)
        group = make_statement_set(rng, image_size, pairs=PAIRS_PER_SET, sentences=SENTENCES_PER_SET, world=world)
        rendered = [[render_scene(s) for s in pair] for pair in group.pairs]  # (image, masks) per scene
        images = [[encode_image(image, image_format) for image, _ in pair] for pair in rendered]
        for k, statement in enumerate(group.statements):
            for p in range(len(group.pairs)):
                if written == n:
                    return
                identifier = f"{split}-{set_id}-{p}-{k}"
                stem = f"{split}-{set_id}-{p}"
                relevant = statement.relevant(*group.pairs[p])
                record = {
                    "identifier": identifier,
                    "sentence": statement.text(),
                    "label": bool(group.labels[k][p]),
                    "left_image": f"{stem}-img0.{image_format}",
                    "right_image": f"{stem}-img1.{image_format}",
                    # Not in NLVR2: per image, the objects the statement counts (as relevant_objects in vqa).
                    "relevant_objects": {"left": list(relevant[0]), "right": list(relevant[1])},
                }
                yield {
                    "__key__": identifier,
                    f"left.{image_format}": images[p][0],
                    f"right.{image_format}": images[p][1],
                    "json": json.dumps(record),
                    **{f"{side}.{RELEVANCE_FILE}": relevance_png(masks, objects)
                       for side, (_, masks), objects in zip(("left", "right"), rendered[p], relevant)},
                }
                written += 1


def write_synthetic(
    out: str | Path,
    splits: dict[str, int],
    *,
    tasks: Sequence[str] = TASKS,
    image_size: int = 64,
    seed: int = 0,
    image_format: str = "jpg",
    shard_size: int = 1000,
    questions_per_image: int = 3,
    world: World = World(),
    progress: bool = True,
    workers: int = 1,
) -> dict[str, dict[str, int]]:
    """Write ``splits`` (split -> number of samples) for each task; returns the counts written.
    ``workers`` > 1 writes that many task/splits at once, in separate processes (same shards)."""
    unknown = [t for t in tasks if t not in TASKS] + [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown task/split {unknown}; tasks are {TASKS}, splits are {SPLITS}")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small to draw 6 shapes apart; use 32 or more")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(build_tokenizer(text_vocabulary()), out)
    source = {"kind": "synthetic", "seed": seed, "image_size": image_size, "world": asdict(world)}
    answers = None
    if "vqa" in tasks:
        answers = f"vqa/{ANSWERS_FILE}"
        (out / "vqa").mkdir(exist_ok=True)
        (out / answers).write_text(json.dumps(vqa_answer_space()) + "\n")
    units = [(task, split, n) for task in tasks for split, n in splits.items() if n > 0]
    options = dict(image_size=image_size, seed=seed, image_format=image_format, shard_size=shard_size,
                   questions_per_image=questions_per_image, world=world)
    if workers > 1 and len(units) > 1:  # each task/split in its own process; shards do not depend on which
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(min(workers, len(units)), mp_context=get_context("spawn")) as pool:
            biggest_first = sorted(range(len(units)), key=lambda i: -units[i][2])
            futures = {i: pool.submit(_write_split, out, *units[i], progress=progress, position=i, **options)
                       for i in biggest_first}  # fmt: skip
            counts = [futures[i].result() for i in range(len(units))]
    else:
        counts = [_write_split(out, task, split, n, progress=progress, **options) for task, split, n in units]
    written: dict[str, dict[str, int]] = {}
    for (task, split, _), shard_counts in zip(units, counts):  # the manifest is written by this process only
        if shard_counts:
            update_manifest(out, task, split, shard_counts, source={**source, "image_format": _format(task, image_format)},
                            answers=answers if task == "vqa" else None)  # fmt: skip
        written.setdefault(task, {})[split] = sum(shard_counts.values())
    return written


def _format(task: str, image_format: str) -> str:
    return "png" if task == "seg" else image_format


def _write_split(out: Path, task: str, split: str, n: int, *, image_size: int, seed: int, image_format: str,
                 shard_size: int, questions_per_image: int, world: World, progress: bool,
                 position: int = 0) -> dict[str, int]:  # fmt: skip
    """Write one task/split's shards; returns the samples per shard (recorded in the manifest by the caller)."""
    if task == "vqa":
        samples = vqa_samples(seed, split, n, image_size, image_format=image_format,
                              questions_per_image=questions_per_image, world=world)  # fmt: skip
    elif task == "nlvr2":
        samples = nlvr2_samples(seed, split, n, image_size, image_format=image_format, world=world)
    else:
        samples = seg_samples(seed, split, n, image_size, world=world)
    sink = ShardSink(out, task, split, maxcount=shard_size, record=False)  # the caller records the split
    with sink, tqdm(total=n, desc=f"synth {task}/{split}", unit="sample", disable=not progress, position=position) as bar:
        for sample in samples:
            sink.write(sample)
            bar.update()
    return sink.counts
