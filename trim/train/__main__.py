"""``python -m trim.train RECIPE.yaml ...``: the entry point for launchers that run a module
(``accelerate launch -m trim.train``, ``deepspeed --module trim.train``, ``torchrun -m trim.train``)."""

import sys

from trim.train.cli import main

sys.exit(main())
