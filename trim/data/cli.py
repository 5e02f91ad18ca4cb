"""``trim data ...``: write the synthetic world, convert official datasets, inspect shards.

    trim data synth --out DIR --train N --val N --test N --image-size 64 --seed 0 --tasks vqa,nlvr2,seg
                    [--min-objects 3 --max-objects 6 --size-scale 1.0]
    trim data vqa2  --out DIR --split train --questions Q.json --annotations A.json --images COCO/train2014
    trim data nlvr2 --out DIR --split dev --annotations dev.json --images nlvr2/dev
    trim data sa1b  --out DIR --split train --images SA1B/  |  --coco-instances instances_val2017.json
    trim data inspect DIR [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from trim.errors import TrimError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trim data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, split: bool = True) -> None:
        p.add_argument("--out", required=True, help="shard directory (created; manifest.json is updated)")
        if split:
            p.add_argument("--split", required=True, help="split name to write, e.g. train, val, test, dev")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("synth", help="write the embedded synthetic shapes world")
    common(p, split=False)
    for split, default in (("train", 10_000), ("val", 1_000), ("test", 1_000)):
        p.add_argument(f"--{split}", type=int, default=default, help=f"{split} samples per task (default {default})")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="vqa,nlvr2,seg", help="comma-separated subset of vqa,nlvr2,seg")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="vqa/nlvr2 images (seg is always png)")
    p.add_argument("--questions-per-image", type=int, default=3)
    p.add_argument("--min-objects", type=int, default=3, help="fewest objects in a scene (default 3)")
    p.add_argument("--max-objects", type=int, default=6, help="most objects in a scene (default 6)")
    p.add_argument("--size-scale", type=float, default=1.0, help="multiplies the object radii (default 1.0)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="task/splits written at once, one process each (default: the CPU cores; same shards)")

    p = sub.add_parser("vqa2", help="VQA v2 questions/annotations JSON + COCO images -> shards")
    common(p)
    p.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<subtype>_questions.json")
    p.add_argument("--annotations", help="v2_mscoco_<subtype>_annotations.json (omit for test splits)")
    p.add_argument("--images", required=True, help="COCO image folder of this split")
    p.add_argument("--vocab-from", nargs="+", help="annotation files for answers.json (ViLT: train and val)")
    p.add_argument("--min-answer-count", type=int, default=9)
    p.add_argument("--tokenizer", help="tokenizer.json to copy instead of building one from the questions")

    p = sub.add_parser("nlvr2", help="NLVR2 JSON-lines + image folder -> shards")
    common(p)
    p.add_argument("--annotations", required=True, help="train.json / dev.json / test1.json")
    p.add_argument("--images", required=True, help="folder with <split>-<set>-<pair>-img0.png (searched recursively)")
    p.add_argument("--tokenizer", help="tokenizer.json to copy instead of building one from the sentences")

    p = sub.add_parser("sa1b", help="SA-1B image+json folder (or COCO instances) -> seg shards")
    common(p)
    p.add_argument("--images", required=True, help="folder with the images (and, for SA-1B, the per-image json)")
    p.add_argument("--annotations", help="folder of SA-1B json files if not beside the images")
    p.add_argument("--coco-instances", help="COCO instances_*.json: convert COCO instead of SA-1B")
    p.add_argument("--no-crowd", action="store_true", help="drop COCO iscrowd annotations")

    p = sub.add_parser("inspect", help="print a shard directory's manifest; --check reads every sample")
    p.add_argument("root")
    p.add_argument("--check", action="store_true", help="read all shards and compare counts with the manifest")
    return parser


def _inspect(root: str, check: bool) -> int:
    from trim.data.shards import read_manifest, split_urls
    from trim.data.stream import build_loader

    manifest = read_manifest(root)
    status = 0
    for task, splits in sorted(manifest["tasks"].items()):
        for split, entry in sorted(splits.items()):
            line = f"{task:<6} {split:<6} {entry['samples']:>8} samples in {len(entry['shards'])} shards  {entry['url']}"
            if check:
                loader = build_loader(split_urls(root, task, split), task, tokenizer=root if task != "seg" else None,
                                      batch_size=64, mode="eval", image_size=32)  # fmt: skip
                for _ in loader:
                    pass
                ok = loader.stats.samples == entry["samples"] and not loader.stats.total_skipped
                status |= 0 if ok else 1
                line += f"  read: {loader.stats.summary()}{'' if ok else '  <-- MISMATCH'}"
            print(line)
    return status


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    progress = not getattr(args, "quiet", False)
    start = time.perf_counter()
    try:
        if args.command == "synth":
            from trim.data.make_synthetic import write_synthetic
            from trim.data.synthetic import World

            try:
                world = World(args.min_objects, args.max_objects, args.size_scale)
            except ValueError as exn:
                print(f"trim data synth: --min-objects/--max-objects/--size-scale: {exn}", file=sys.stderr)
                return 2
            written = write_synthetic(
                args.out, {"train": args.train, "val": args.val, "test": args.test},
                tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], image_size=args.image_size,
                seed=args.seed, image_format=args.image_format, shard_size=args.shard_size,
                questions_per_image=args.questions_per_image, world=world, progress=progress,
                workers=args.workers,
            )  # fmt: skip
            for task, counts in written.items():
                print(f"{task}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))
            print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
        elif args.command == "vqa2":
            from trim.data.convert import convert_vqa2

            convert_vqa2(args.out, split=args.split, questions=args.questions, annotations=args.annotations,
                         images=args.images, vocab_annotations=args.vocab_from, min_answer_count=args.min_answer_count,
                         tokenizer=args.tokenizer, shard_size=args.shard_size, progress=progress)  # fmt: skip
        elif args.command == "nlvr2":
            from trim.data.convert import convert_nlvr2

            convert_nlvr2(args.out, split=args.split, annotations=args.annotations, images=args.images,
                          tokenizer=args.tokenizer, shard_size=args.shard_size, progress=progress)  # fmt: skip
        elif args.command == "sa1b":
            from trim.data.convert import convert_coco, convert_sa1b

            if args.coco_instances:
                convert_coco(args.out, split=args.split, instances=args.coco_instances, images=args.images,
                             keep_crowd=not args.no_crowd, shard_size=args.shard_size, progress=progress)  # fmt: skip
            else:
                convert_sa1b(args.out, split=args.split, images=args.images, annotations=args.annotations,
                             shard_size=args.shard_size, progress=progress)  # fmt: skip
        else:
            return _inspect(args.root, args.check)
    except TrimError as exn:
        print(f"trim data {args.command}: {type(exn).__name__}: {exn}", file=sys.stderr)
        return 1
    return 0
