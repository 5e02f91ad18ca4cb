"""The `trim` command.

Each subcommand lives in the package that owns it and parses its own arguments; this
file only routes `trim <command> [<sub>] ...` to it, importing lazily so `trim --help`
stays fast and a missing optional piece does not break the other commands.
"""

from __future__ import annotations

import importlib
import sys

# command -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trim.demo:main", "run the main job on the embedded synthetic data"),
    "bench": ("trim.eval.bench:main", "wall-clock full vs trimmed (`trim bench core`, `trim bench CKPT`)"),
    "data": ("trim.data.cli:main", "make or inspect data (`trim data synth ...`)"),
    "train": ("trim.train.cli:main", "train from a recipe: trim train RECIPE.yaml [key=value ...]"),
    "eval": ("trim.eval.cli:main", "evaluate a checkpoint: trim eval CKPT --task vqa|nlvr2|seg --data SHARDS "
                                      "(`trim eval report`, `trim eval score`)"),
    "pretrain-vision": ("trim.train.pretrain_vision:main", "train a recipe's vision tower on the synthetic world's "
                                                           "patch attributes: trim pretrain-vision RECIPE --data SHARDS --out DIR"),
    "calibrate": ("trim.eval.calibrate:main", "fit the budget a checkpoint keeps: trim calibrate CKPT --data SHARDS"),
}


def _usage() -> str:
    lines = ["usage: trim <command> [args...]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trim: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
