"""The miniature protocol's references (held-out objects asked on another background) and attribute agreement."""

from __future__ import annotations

import json

import torch

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


def test_the_reports_references_are_held_out_unless_the_training_split_is_asked_for() -> None:
    from ipadapter.miniature.quality import Inputs

    held, seen = Inputs.build(8), Inputs.build(8, "train")
    assert {a.triple for a in held.attrs} <= HELD_OUT
    assert not {a.triple for a in seen.attrs} & HELD_OUT
