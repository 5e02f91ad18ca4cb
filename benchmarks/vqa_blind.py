"""Does a checkpoint look at the image? Full vs blind accuracy on one split, overall and per type.

    python benchmarks/vqa_blind.py CHECKPOINT --data data/shapes [--task vqa|nlvr2] [--split val]
                                   [--max-samples N] [--out DIR]

Runs `trim eval` twice over the same samples, with the real images and blind (every image a
constant: trim.eval.blind), without speed measurement or overlays, and prints
``trim.eval.blind.compare_blind``'s table. A model that uses the image is far above blind;
full == blind means the image is ignored (issue 11). The two eval JSONs land in
``OUT/eval/`` (default: the checkpoint's), as `trim eval` and `trim eval --blind` write them.
"""

from __future__ import annotations

import argparse
import sys

from trim.errors import TrimError
from trim.eval.blind import compare_blind
from trim.eval.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model directory or run folder")
    p.add_argument("--data", required=True, help="shard root written by `trim data synth`")
    p.add_argument("--task", default="vqa", choices=("vqa", "nlvr2"))
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--max-samples", type=int)
    p.add_argument("--out", help="results go to OUT/eval/ (default: CHECKPOINT/eval/)")
    args = p.parse_args(argv)
    common = dict(split=args.split, batch_size=args.batch_size, max_samples=args.max_samples, out=args.out,
                  speed=False, figures=0, progress=False)
    try:
        full = evaluate(args.checkpoint, args.task, args.data, **common)
        blind = evaluate(args.checkpoint, args.task, args.data, blind=True, **common)
    except TrimError as exn:
        print(f"vqa_blind: {type(exn).__name__}: {exn}", file=sys.stderr)
        return 1
    print(compare_blind(full, blind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
