#!/usr/bin/env python
"""Same as `trim data nlvr2 ...` (see trim/data/cli.py); run with --help for the options."""

import sys

from trim.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["nlvr2", *sys.argv[1:]]))
