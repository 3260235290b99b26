"""Resolution stages in FLUX and SD 3 runs (`--stages`): each stage is the run at its resolution from the previous
stage's final adapter, as a plain run with `--init-from` that file is, and the output folder gets the last stage's
files; a stage the base cannot take is refused before the first stage trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.cli.main import main
from ipadapter.train import TrainConfig, train
from tests import dit_factories as df
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds an Accelerator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return df.save_sd3_base(root), factories.write_images(root / "data", 4)


def _config(setup, out, **overrides) -> TrainConfig:
    base, data = setup
    values = dict(variant="sd3", base=str(base), image_encoder=str(base / "image_encoder"), data=str(data),
                  batch_size=2, num_workers=0, seed=5, learning_rate=1e-2, output=str(out))
    return TrainConfig(**{**values, **overrides})


def test_each_stage_is_the_run_from_the_previous_stages_adapter(setup, tmp_path) -> None:
    staged = train(_config(setup, tmp_path / "staged", stages=["16:2", "32:1"]))
    first = tmp_path / "staged" / "stages" / "1-16px" / "adapter.ipadapter.safetensors"
    alone = train(_config(setup, tmp_path / "alone", resolution=32, max_steps=1, init_from=str(first)))
    ours, theirs = load_file(str(staged.published)), load_file(str(alone.published))
    assert staged.published == tmp_path / "staged" / "ip-adapter.safetensors"
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "staged" / "stages" / "2-32px" / "logs" / "losses.csv").read_text() == \
        (tmp_path / "alone" / "logs" / "losses.csv").read_text()
    assert "## Stages" in (tmp_path / "staged" / "README.md").read_text()


def test_a_stage_the_base_cannot_take_is_refused_before_the_first_trains(setup, tmp_path, capsys) -> None:
    base, data = setup
    code = main(["train", "--variant", "sd3", "--base", str(base), "--image-encoder", str(base / "image_encoder"),
                 "--data", str(data), "--stages", "16:1", "15:1", "--output", str(tmp_path / "run")])
    assert code != 0
    assert capsys.readouterr().err.strip() == ("ipadapter: error: --stages entry 15:1: resolution 15 does not fit this "
                                               "SD 3 base: it must be a multiple of 2 (VAE downscale × the "
                                               "transformer's patch size)")
    assert not (tmp_path / "run" / "stages").exists()
