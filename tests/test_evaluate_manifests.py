"""Manifests: bad references listed and skipped, an empty manifest refused, the COCO and DreamBench converters."""

from __future__ import annotations

import json

import pytest

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate.manifests import from_coco_captions, from_dreambench, read_manifest, write_manifest
from tests import factories


def test_missing_and_unreadable_references_are_listed_skipped_and_counted(tmp_path) -> None:
    factories.reference_image(0).save(tmp_path / "a.png")
    factories.reference_image(1).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write_manifest(tmp_path / "m.jsonl", [
        {"image_file": "a.png", "text": "first"}, {"image_file": "gone.png", "text": "x"},
        {"image_file": "broken.png", "text": "y"}, {"text": "no image"}, {"image_file": "b.png", "text": "last"},
    ])
    manifest = read_manifest(path)
    assert [(e.index, e.text) for e in manifest.entries] == [(0, "first"), (4, "last")]
    assert len(manifest.skipped) == 3
    assert "gone.png" in manifest.skipped[0] and "broken.png" in manifest.skipped[1]
    assert [e.index for e in read_manifest(path, limit=1).entries] == [0]


def test_empty_manifest_is_a_user_error(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(IPAdapterError, match="no usable references"):
        read_manifest(tmp_path / "empty.jsonl")
    with pytest.raises(IPAdapterError, match="not found"):
        read_manifest(tmp_path / "absent.jsonl")


def test_coco_converter_takes_the_first_caption_per_image(tmp_path) -> None:
    (tmp_path / "val").mkdir()
    for i in (1, 2):
        factories.reference_image(i).save(tmp_path / "val" / f"{i:012d}.jpg")
    captions = {"images": [{"id": 2, "file_name": "000000000002.jpg"}, {"id": 1, "file_name": "000000000001.jpg"}],
                "annotations": [{"id": 9, "image_id": 1, "caption": "later"}, {"id": 3, "image_id": 1, "caption": " a dog "},
                                {"id": 5, "image_id": 2, "caption": "a cat"}, {"id": 7, "image_id": 2, "caption": "later"}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    manifest = read_manifest(from_coco_captions(tmp_path / "captions.json", tmp_path / "val", tmp_path / "out" / "m.jsonl"))
    assert [e.text for e in manifest.entries] == ["a dog", "a cat"] and not manifest.skipped


PROMPTS = """Classes
subject_name,class
backpack,backpack
dog2,dog
rc_car,toy

Prompts
Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
]

Live Subject Prompts
prompt_list = [
'a {0} {1} wearing a hat'.format(unique_token, class_token),
]
"""


def test_dreambench_converter_pairs_subjects_with_their_prompts(tmp_path) -> None:
    for subject, names in {"backpack": ["00.jpg", "01.jpg"], "dog2": ["00.jpg", "01.jpg"],
                           "rc_car": ["00.jpg", "01.jpg"], "wolf_plushie2": ["01.jpeg", "00.PNG", "notes.txt"]}.items():
        (tmp_path / subject).mkdir()
        for i, name in enumerate(names):
            factories.reference_image(i).save(tmp_path / subject / name, format="PNG")
    (tmp_path / "empty_subject").mkdir()
    (tmp_path / "prompts_and_classes.txt").write_text(PROMPTS)
    manifest = read_manifest(from_dreambench(tmp_path, tmp_path / "m.jsonl"))
    texts = ["a backpack in the jungle", "a backpack on the beach", "a dog wearing a hat", "a toy in the jungle",
             "a toy on the beach",  # rc_car's class is the listed one, not its folder name
             "a wolf plushie in the jungle", "a wolf plushie on the beach"]  # unlisted: the folder name, digits cut
    assert [e.text for e in manifest.entries] == texts
    assert [e.image_file.name for e in manifest.entries] == ["00.jpg"] * 5 + ["00.PNG"] * 2
    with pytest.raises(IPAdapterError, match="prompts_and_classes"):
        from_dreambench(tmp_path / "backpack", tmp_path / "x.jsonl")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "prompts_and_classes.txt").write_text(PROMPTS)
    with pytest.raises(IPAdapterError, match="no subjects with images and prompts found in"):
        from_dreambench(tmp_path / "none", tmp_path / "x.jsonl")


def test_a_manifest_is_written_into_folders_it_creates_and_reads_back(tmp_path) -> None:
    factories.reference_image(0).save(tmp_path / "r.png")
    path = write_manifest(tmp_path / "a" / "b" / "m.jsonl", [{"image_file": "../../r.png", "text": "un café crème"}])
    assert [e.text for e in read_manifest(path).entries] == ["un café crème"]
