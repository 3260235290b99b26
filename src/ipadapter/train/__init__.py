"""`ipadapter train`: the paper's training recipe for every adapter variant, on one machine or many.

Layout: config (what to train) ← data, dropout, cache (what it sees) ← models (the frozen base) ← trainer (the loop,
in accelerate's fixed order) ← checkpoint, validate. The CLI (`ipadapter.cli.train`) is a thin layer over `train`.
"""

from ipadapter.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, **kwargs):
    """Run a training job; see `ipadapter.train.trainer.train`."""
    from ipadapter.train.trainer import train as _train

    return _train(config, **kwargs)
