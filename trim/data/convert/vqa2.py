"""VQA v2 (official questions + annotations JSON, COCO images) -> ``<out>/vqa`` shards.

Inputs, as downloaded from visualqa.org:

- questions: ``{"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}]}``
- annotations (absent for test-dev/test): ``{"annotations": [{"question_id", "image_id",
  "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
  "answer_confidence", "answer_id"} x 10]}]}``
- images: the COCO folder (``COCO_train2014_000000000009.jpg`` or ``000000000009.jpg``)

The shards keep the raw answers; the loader turns them into soft scores with
``<out>/vqa/answers.json``, built here from ``vocab_annotations`` (ViLT/METER: train + val
``multiple_choice_answer``, normalised, seen >= 9 times). A test split has no answers and
gets all-zero labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from trim.data.answers import DEFAULT_MIN_ANSWER_COUNT, build_answer_vocab
from trim.data.convert.common import (
    Summary,
    ensure_tokenizer,
    image_extension,
    index_images,
    load_json,
    read_checked_image,
    trailing_number,
)
from trim.data.shards import ANSWERS_FILE, ShardSink
from trim.errors import DataError


def build_vocab_file(out: Path, annotation_files: Sequence[str | Path], min_count: int) -> list[str]:
    answers = []
    for path in annotation_files:
        data = load_json(path, what="VQA annotations", required=("annotations",))
        answers += [a["multiple_choice_answer"] for a in data["annotations"]]
    vocab = build_answer_vocab(answers, min_count)
    if not vocab:
        raise DataError(f"no answer is seen >= {min_count} times in {list(map(str, annotation_files))}; "
                        "lower --min-answer-count for small subsets")  # fmt: skip
    (out / "vqa").mkdir(parents=True, exist_ok=True)
    (out / "vqa" / ANSWERS_FILE).write_text(json.dumps(vocab) + "\n")
    return vocab


def convert_vqa2(
    out: str | Path,
    *,
    split: str,
    questions: str | Path,
    images: str | Path,
    annotations: str | Path | None = None,
    vocab_annotations: Sequence[str | Path] | None = None,
    min_answer_count: int = DEFAULT_MIN_ANSWER_COUNT,
    tokenizer: str | Path | None = None,
    shard_size: int = 1000,
    progress: bool = True,
) -> Summary:
    """Write one VQA v2 split; prints a progress bar, returns (and prints) the summary."""
    out = Path(out)
    q_data = load_json(questions, what="VQA questions", required=("questions",))
    by_question: dict[int, dict] = {}
    if annotations is not None:
        a_data = load_json(annotations, what="VQA annotations", required=("annotations",))
        by_question = {a["question_id"]: a for a in a_data["annotations"]}

    vocab_sources = vocab_annotations or ([annotations] if annotations is not None else [])
    answers_path = out / "vqa" / ANSWERS_FILE
    if vocab_annotations or (vocab_sources and not answers_path.is_file()):
        build_vocab_file(out, vocab_sources, min_answer_count)

    qs = sorted(q_data["questions"], key=lambda q: (q["image_id"], q["question_id"]))
    ensure_tokenizer(out, [q["question"] for q in qs], tokenizer)
    by_image_id = {}
    for name, path in index_images(images).items():
        number = trailing_number(name)
        if number is not None:
            by_image_id.setdefault(number, path)

    subtype = q_data.get("data_subtype", "?")
    summary = Summary(f"vqa2 {split}")
    source = {"kind": "vqa2", "questions": str(questions), "annotations": str(annotations) if annotations else None}
    cached_id, cached = None, None  # questions are sorted by image: read each image once
    with ShardSink(out, "vqa", split, maxcount=shard_size, source=source, answers=f"vqa/{ANSWERS_FILE}") as sink:
        for q in tqdm(qs, desc=f"vqa2 {split}", unit="question", disable=not progress):
            image_id, question_id = q["image_id"], q["question_id"]
            annotation = by_question.get(question_id)
            if annotations is not None and annotation is None:
                summary.skip("no annotation for the question", str(question_id))
                continue
            path = by_image_id.get(image_id)
            if path is None:
                summary.skip("missing image", f"COCO_{subtype}_{image_id:012d}.jpg")
                continue
            if image_id != cached_id:
                cached_id, cached = image_id, read_checked_image(path)
            if cached is None:
                summary.skip("undecodable image", path.name)
                continue
            record = {"question_id": question_id, "image_id": image_id, "question": q["question"],
                      "question_type": "", "answer_type": "", "multiple_choice_answer": None, "answers": []}  # fmt: skip
            if annotation is not None:
                for field in ("question_type", "answer_type", "multiple_choice_answer", "answers"):
                    record[field] = annotation.get(field, record[field])
            sink.write({"__key__": str(question_id), image_extension(path): cached, "json": json.dumps(record)})
            summary.written += 1
    if not answers_path.is_file():
        summary.notes.append(f"{answers_path} does not exist yet: convert an annotated split or pass --vocab-from")
    print(summary.report())
    return summary
