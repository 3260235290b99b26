"""The miniature protocol's references (held-out objects asked on another background) and attribute agreement."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ipadapter.evaluate.manifests import read_manifest
from ipadapter.miniature.judge import AttributeClassifier, Judge
from ipadapter.miniature.protocol import miniature_manifest
from ipadapter.miniature.world import ATTRIBUTES, HELD_OUT, Attrs, caption


def test_references_are_held_out_and_the_text_asks_for_another_background(tmp_path) -> None:
    manifest = read_manifest(miniature_manifest(tmp_path, 6))
    assert len(manifest.entries) == 6 and not manifest.skipped
    for entry in manifest.entries:
        target = Attrs(**entry.attrs)
        assert entry.text == caption(target) and target.bg_colour != target.colour
        assert entry.image().size == (64, 64)
    assert read_manifest(miniature_manifest(tmp_path / "again", 6)).entries[0].text == manifest.entries[0].text


def test_reference_scenes_use_held_out_triples(tmp_path) -> None:
    for line in (miniature_manifest(tmp_path, 4)).read_text().splitlines():
        record = json.loads(line)
        words = record["reference_text"].split()  # a {size} {colour} {shape} at the ... on a {bg} ... background
        bg = words[words.index("on") + 2]
        assert (words[3], words[2], bg) in HELD_OUT


def test_attribute_agreement_reports_every_attribute_and_all(tmp_path) -> None:
    torch.manual_seed(0)
    judge = Judge(AttributeClassifier(width=8), clip=None)
    manifest = read_manifest(miniature_manifest(tmp_path, 3))
    images = [e.image() for e in manifest.entries]
    report = judge.accuracy(images, [e.attrs for e in manifest.entries])
    assert set(report) == set(ATTRIBUTES) | {"all"} and all(0 <= v <= 1 for v in report.values())
    predicted = [Attrs(**p) for p in judge.predict(images)]
    assert judge.accuracy(images, predicted) == dict.fromkeys([*ATTRIBUTES, "all"], 1.0)


def test_agreement_counts_each_attribute_and_all_over_every_image(tmp_path) -> None:
    """Against the classifier's own reading with one slot changed in image 0 and another in image 1 of 3: those
    attributes 2/3, the rest 1, "all" (every attribute right) 1/3; a truth list of another length is refused."""
    import pytest

    torch.manual_seed(0)
    judge = Judge(AttributeClassifier(width=8), clip=None)
    images = [e.image() for e in read_manifest(miniature_manifest(tmp_path, 3)).entries]
    read = judge.predict(images)
    other = {n: next(v for v in values if v != read[0][n]) for n, values in ATTRIBUTES.items()}
    truth = [read[0] | {"shape": other["shape"]}, read[1] | {"pattern": other["pattern"]}, read[2]]
    expected = dict.fromkeys(ATTRIBUTES, 1.0) | {"shape": 2 / 3, "pattern": 2 / 3, "all": 1 / 3}
    assert judge.accuracy(images, truth) == pytest.approx(expected, abs=1e-12)
    assert judge.correct(images, truth)[1] == dict.fromkeys(ATTRIBUTES, True) | {"pattern": False}
    with pytest.raises(ValueError):
        judge.accuracy(images, truth[:2])


def test_the_reports_references_are_held_out_unless_the_training_split_is_asked_for() -> None:
    from ipadapter.miniature.quality import Inputs

    held, seen = Inputs.build(8), Inputs.build(8, "train")
    assert {a.triple for a in held.attrs} <= HELD_OUT
    assert not {a.triple for a in seen.attrs} & HELD_OUT


def test_the_protocols_judges_are_the_bundled_judge_or_the_folder_given(tmp_path) -> None:
    """Both judges read the shipped judge folder by default, and another folder when one is given: a copy whose
    weights were changed is what gets loaded then."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ipadapter.bundled import judge_path
    from ipadapter.evaluate.judges import ClipJudge
    from ipadapter.miniature import protocol, tiny_clip

    shipped = judge_path()
    copy = tmp_path / "judge"
    shutil.copytree(shipped, copy)
    for path in (copy / "classifier.safetensors", copy / "clip" / "model.safetensors"):
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in load_file(path).items()}, path)

    def first_float(path: Path) -> tuple[str, torch.Tensor]:
        return next((k, v.float()) for k, v in load_file(path).items() if v.is_floating_point())

    for folder, read in ((None, shipped), (shipped, shipped), (str(copy), copy)):
        clip_name, clip_weight = first_float(read / "clip" / "model.safetensors")
        classifier_name, classifier_weight = first_float(read / "classifier.safetensors")
        clip = protocol.clip_judge(folder)
        assert isinstance(clip, ClipJudge)
        assert clip.processor.to_dict() == tiny_clip.image_processor().to_dict()
        torch.testing.assert_close(clip.model.state_dict()[clip_name], clip_weight)
        judge = protocol.attribute_judge(folder)
        assert isinstance(judge, Judge)
        torch.testing.assert_close(judge.classifier.state_dict()[classifier_name], classifier_weight)
        torch.testing.assert_close(judge.clip.model.state_dict()[clip_name], clip_weight)
    for name in ("classifier.safetensors", "clip/model.safetensors"):
        assert not torch.equal(first_float(copy / name)[1], first_float(shipped / name)[1])


def test_another_background_keeps_the_object_and_changes_both_background_slots() -> None:
    import numpy as np

    from ipadapter.miniature.protocol import other_background
    from ipadapter.miniature.world import COLOURS, PATTERNS

    rng = np.random.default_rng(0)
    seen_colours, seen_patterns = set(), set()
    scene = Attrs("ring", "red", "small", "top", "blue", "checkered")
    for _ in range(400):
        target = other_background(scene, rng)
        assert (target.shape, target.colour, target.size, target.position) == ("ring", "red", "small", "top")
        seen_colours.add(target.bg_colour)
        seen_patterns.add(target.pattern)
    assert seen_colours == set(COLOURS) - {"red", "blue"}
    assert seen_patterns == set(PATTERNS) - {"checkered"}


def test_references_are_the_documented_scenes_on_backgrounds_drawn_with_the_next_seed(tmp_path) -> None:
    """docs/evaluation.md: references are `world.make_batch(4242, N, "heldout")`, new backgrounds drawn with 4243."""
    import numpy as np

    from ipadapter.miniature.protocol import other_background
    from ipadapter.miniature.world import make_batch

    path = miniature_manifest(tmp_path, 5)
    assert path == tmp_path / "manifest.jsonl"
    images, scenes = make_batch(4242, 5, "heldout")
    rng = np.random.default_rng(4243)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, (record, image, scene) in enumerate(zip(records, images, scenes, strict=True)):
        target = other_background(scene, rng)
        assert record == {"image_file": f"images/heldout_{i:04d}.png", "text": caption(target),
                          "attrs": target.__dict__, "reference_text": caption(scene)}
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["image_file"])), image)
