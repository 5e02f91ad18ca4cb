#!/usr/bin/env python
"""Same as `trim data sa1b ...` (see trim/data/cli.py); run with --help for the options."""

import sys

from trim.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["sa1b", *sys.argv[1:]]))
