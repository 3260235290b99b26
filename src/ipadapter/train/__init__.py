"""`ipadapter train`: the paper's training recipe for every adapter variant, on one machine or many.

Layout: config (what to train) ← data, buckets, dropout, cache (what it sees), feed (the data phase) ← models (the
frozen base), shapes (a new adapter's shape) ← step (one guarded step) ← trainer (the phases, in accelerate's fixed
order) ← checkpoint, validate, model_folder; transformer (FLUX and SD 3 runs: the same config, checkpoints and
validation around `dit.flow`) ← transformer_feed (their data phase); stages (a sequence of runs of either); memory
(optimizer choice, the dry-run estimate). The CLI (`ipadapter.cli.train`) is a thin layer over `train`.
"""

from ipadapter.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, **kwargs):
    """Run a training job (its stages in order when it has any): a UNet adapter (`ipadapter.train.trainer.train`) or
    a FLUX or SD 3 one (`ipadapter.train.transformer.train_transformer`), as the variant says."""
    from ipadapter.variants import get_variant

    check = None
    if get_variant(config.variant).denoiser == "unet":
        from ipadapter.train.trainer import train as train_one
    else:
        from ipadapter.errors import IPAdapterError
        from ipadapter.train.transformer import check_stages as check
        from ipadapter.train.transformer import train_transformer as train_one

        unet_only = sorted(set(kwargs) - {"on_step", "log_with"})  # models and encoders in memory: a UNet run's
        if unet_only:
            raise IPAdapterError(f"a {config.variant!r} run takes on_step and log_with only, not "
                                 f"{', '.join(unet_only)}")
    if config.stages:
        from ipadapter.train.stages import run_stages

        return run_stages(config, train_one, check=check, **kwargs)
    return train_one(config, **kwargs)
