"""Training: recipes -> accelerate / DeepSpeed loop -> checkpoints. See docs/training.md."""

from trim.train.objectives import METHODS, Objective, register, task_loss

__all__ = ["METHODS", "Objective", "register", "task_loss", "train"]


def train(recipe):  # lazy: importing trim.train must not pull in accelerate
    from trim.train.trainer import train as _train

    return _train(recipe)
