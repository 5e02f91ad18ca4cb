"""Same as `trim bench core` (see trim/eval/bench_core.py for what it measures)."""

import sys

from trim.eval.bench_core import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
