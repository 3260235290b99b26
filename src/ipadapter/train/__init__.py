"""`ipadapter train`: the paper's training recipe for every adapter variant, on one machine or many.

Layout: config (what to train) ← data, buckets, dropout, cache (what it sees), feed (the data phase) ← models (the
frozen base), shapes (a new adapter's shape) ← step (one guarded step) ← trainer (the phases, in accelerate's fixed
order) ← checkpoint, validate, model_folder; stages (a sequence of runs); memory (optimizer choice, the dry-run
estimate). The CLI (`ipadapter.cli.train`) is a thin layer over `train`.
"""

from ipadapter.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, **kwargs):
    """Run a training job (its stages in order when it has any); see `ipadapter.train.trainer.train`."""
    from ipadapter.train.trainer import train as _train

    if config.stages:
        from ipadapter.train.stages import run_stages

        return run_stages(config, _train, **kwargs)
    return _train(config, **kwargs)
