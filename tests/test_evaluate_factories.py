"""The measuring models of `tests.factories` (a random judge CLIP, DINOv2) load as the evaluation reads them."""

from __future__ import annotations

from tests import factories


def test_tiny_judge_folder_loads_as_a_full_clip(tmp_path) -> None:
    from ipadapter.evaluate.judges import ClipJudge

    judge = ClipJudge.load(factories.save_judge(tmp_path / "judge"))
    assert judge.text_embeds(["a cat"]).shape == judge.image_embeds([factories.reference_image(0)]).shape == (1, 24)
