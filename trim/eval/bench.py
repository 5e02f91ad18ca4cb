"""`trim bench`: wall-clock full vs trimmed.

`trim bench core` times the bare prunable core; `trim bench sam` a SAM image encoder with
window-wise trimming and big.LITTLE (`trim.eval.bench_sam`); `trim bench CHECKPOINT_OR_RECIPE`
times a model (see `trim.eval.bench_model`); `trim bench retention` trains and evaluates every
pruning method side by side on the synthetic world (see `trim.retention`).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if argv and argv[0] == "retention":
        from trim.retention import main as retention_main

        return retention_main(argv[1:])
    if argv and argv[0] == "core":
        from trim.eval.bench_core import main as core_main

        return core_main(argv[1:])
    if argv and argv[0] == "sam":
        from trim.eval.bench_sam import main as sam_main

        return sam_main(argv[1:])
    from trim.eval.bench_model import main as model_main

    return model_main(argv)
