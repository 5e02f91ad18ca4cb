"""Score the runs of a `trim bench retention` folder on another val split, and print its table.

    python benchmarks/retention_rescore.py runs/retention runs/val5k --out runs/val5k_eval [--task vqa]

A 1,000-sample split knows an accuracy to about +-2 points (95%): too coarse to rank methods that
differ by one. This evaluates the full model (with and without the image) and every pruned run
found in the folder on DATA (e.g. `trim data synth --train 0 --val 5000 --seed 1 ...`, same world
flags), without timing, and prints the retention table over those results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trim.retention import METHODS, TARGETS, evaluate, print_table, run_name

NO_TIMING = ("--no-speed", "--figures", "0")


def rescore(runs: Path, data: Path, out: Path, task: str) -> dict:
    full = runs / run_name(task, "full")
    trimmed = [runs / run_name(task, m, t) for t in TARGETS for m in METHODS]

    def score(run: Path, *extra: str, stem: str = task) -> Path:
        return evaluate(run, task, data, batch_size=64, extra=(*NO_TIMING, *extra), stem=stem, out=out / run.name)

    return {"full": score(full), "blind": score(full, "--blind", stem=f"{task}_blind"),
            "trimmed": [score(run) for run in trimmed if (run / "latest").is_file()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="a `trim bench retention --out` folder")
    p.add_argument("data", type=Path, help="the data folder whose val split scores them")
    p.add_argument("--out", type=Path, required=True, help="where the eval results go (one folder per run)")
    p.add_argument("--task", choices=("vqa", "nlvr2"), default="vqa")
    a = p.parse_args()
    print_table(rescore(a.runs, a.data, a.out, a.task))


if __name__ == "__main__":
    main()
