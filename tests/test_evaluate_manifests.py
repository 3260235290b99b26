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
    manifest = read_manifest(from_coco_captions(tmp_path / "captions.json", tmp_path / "val", tmp_path / "out" / "m.jsonl").path)
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
    manifest = read_manifest(from_dreambench(tmp_path, tmp_path / "m.jsonl").path)
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


def _coco_folder(tmp_path, present=(1, 3)):
    """Three COCO images (ids 1-3), each with one caption; only those in `present` exist as files."""
    (tmp_path / "val").mkdir()
    for i in present:
        factories.reference_image(i).save(tmp_path / "val" / f"{i:012d}.jpg")
    captions = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
                "annotations": [{"id": 10 + i, "image_id": i, "caption": f"caption {i}"} for i in (1, 2, 3)]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path / "captions.json", tmp_path / "val"


def test_coco_manifest_holds_exactly_the_usable_images_and_lists_the_rest(tmp_path, capsys) -> None:
    """Image 2's file is missing: the file holds images 1 and 3 only, and the summary counts what the file holds."""
    from ipadapter.cli.main import main

    captions, images = _coco_folder(tmp_path)
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "coco", str(captions), str(images), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["text"] for line in lines] == ["caption 1", "caption 3"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out}: 2 entries, 1 left out"
    assert len(printed) == 2 and "000000000002.jpg" in printed[1]
    assert not read_manifest(out).skipped


@pytest.mark.parametrize("limit, texts", [(1, ["caption 1"]), (3, ["caption 1", "caption 3"])])
def test_coco_limit_takes_the_first_images_by_id(tmp_path, limit, texts) -> None:
    captions, images = _coco_folder(tmp_path)
    manifest = from_coco_captions(captions, images, tmp_path / "m.jsonl", limit=limit)
    assert [e.text for e in read_manifest(manifest.path).entries] == texts


COCO_BAD = {  # the captions file's bytes (None: no file), and words of the one-line error
    "captions missing": (None, "captions file not found"),
    "captions not JSON": (b"hello", "is not JSON (line 1, column 1"),
    "captions not UTF-8": (b'{"images": "\xff"}', "is not UTF-8"),
    "captions a JSON object without annotations": (b"{}", "it has no 'images' list"),
    "captions a JSON list": (b"[]", "is not COCO captions JSON"),
    "annotation without a caption": (json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1}]}).encode(),
                                     "each annotation an id, an image_id and a caption"),
}


@pytest.mark.parametrize("case", list(COCO_BAD))
def test_bad_coco_captions_are_one_line_and_write_nothing(tmp_path, capsys, case) -> None:
    from ipadapter.cli.main import main

    _coco_folder(tmp_path)
    content, words = COCO_BAD[case]
    captions = tmp_path / "c.json"
    if content is not None:
        captions.write_bytes(content)
    out = tmp_path / "out" / "m.jsonl"
    assert main(["manifest", "coco", str(captions), str(tmp_path / "val"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("images, out, extra, words", [
    ("val", "m.jsonl", ["--limit", "-1"], "--limit must be at least 1, got -1"),
    ("val", "m.jsonl", ["--limit", "0"], "--limit must be at least 1, got 0"),
    ("nothere", "m.jsonl", [], "COCO image folder not found: {tmp}/nothere"),
    ("captions.json", "m.jsonl", [], "COCO image folder {tmp}/captions.json is not a folder"),
    ("val", "captions.json/m.jsonl", [], "--out {tmp}/captions.json/m.jsonl: {tmp}/captions.json is a file, not a "
                                         "folder"),
    ("val", "/proc/m.jsonl", [], "/proc/m.jsonl: the folder /proc is not writable"),  # not even for root
])
def test_refused_coco_runs_leave_no_manifest(tmp_path, capsys, images, out, extra, words) -> None:
    from ipadapter.cli.main import main

    captions, _ = _coco_folder(tmp_path)
    assert main(["manifest", "coco", str(captions), str(tmp_path / images), "--out", str(tmp_path / out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words.format(tmp=tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.json", "val"]


def test_with_nothing_usable_the_commonest_reason_is_the_one_shown(tmp_path, capsys) -> None:
    """Images 1 and 3 are missing, image 2 has no caption: the error shows a missing file, the commoner reason."""
    from ipadapter.cli.main import main

    captions, images = _coco_folder(tmp_path, present=())
    data = json.loads(captions.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    captions.write_text(json.dumps(data))
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "coco", str(captions), str(images), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ipadapter: error: no usable references for {out} (3 skipped; 2 of them like this: image file not found: "
        f"{images / '000000000001.jpg'}); nothing was written")
    assert not out.exists()


def test_skipped_lines_are_numbered_as_in_the_file_and_seeds_count_non_empty_lines(tmp_path) -> None:
    """Line numbers are the file's (an editor's, `generate --manifest`'s); an entry's index (its seeds) counts the
    non-empty lines before it, so the blank lines here move the numbers but not the indexes."""
    factories.reference_image(0).save(tmp_path / "a.png")
    lines = ['{"image_file": "a.png", "text": "first"}', "", '{"image_file": "gone.png"}', "not json", "[1, 2]",
             '{"text": "no image"}', '{"image_file": 5}', "   ", '{"image_file": "a.png", "text": "last"}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    manifest = read_manifest(tmp_path / "m.jsonl")
    assert manifest.skipped == [f"line 3: image file not found: {tmp_path / 'gone.png'}",
                                "line 4: not JSON (Expecting value at column 1)", "line 5: not a JSON object",
                                "line 6: a JSON object without image_file",
                                "line 7: image_file must be a path string, got 5"]
    assert [(e.index, e.text) for e in manifest.entries] == [(0, "first"), (6, "last")]


def test_coco_command_limit_takes_the_first_images_by_id(tmp_path, capsys) -> None:
    """`--limit 1` reaches the converter: the file holds image 1 only (the converter's own test shows which)."""
    from ipadapter.cli.main import main

    captions, images = _coco_folder(tmp_path)
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "coco", str(captions), str(images), "--out", str(out), "--limit", "1"]) == 0
    assert [e.text for e in read_manifest(out).entries] == ["caption 1"]
    assert capsys.readouterr().out == f"wrote {out}: 1 entries\n"


@pytest.mark.parametrize("missing", [20, 21])
def test_the_summary_lists_twenty_left_out_references_then_counts_the_rest(tmp_path, capsys, missing) -> None:
    from ipadapter.cli.main import main

    (tmp_path / "val").mkdir()
    factories.reference_image(0).save(tmp_path / "val" / "0.jpg")
    ids = range(missing + 1)
    captions = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in ids],
                "annotations": [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in ids]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "coco", str(tmp_path / "captions.json"), str(tmp_path / "val"), "--out", str(out)]) == 0
    skipped = from_coco_captions(tmp_path / "captions.json", tmp_path / "val", tmp_path / "again.jsonl").skipped
    expected = [f"wrote {out}: 1 entries, {missing} left out", *(f"  left out {line}" for line in skipped[:20])]
    expected += [f"  ... and {missing - 20} more"] if missing > 20 else []
    assert capsys.readouterr().out.splitlines() == expected


def _dreambench(root):
    """Two subjects of three images each, with the prompts above."""
    for subject in ("backpack", "dog2"):
        (root / subject).mkdir(parents=True)
        for i in range(3):
            factories.reference_image(i).save(root / subject / f"{i:02d}.jpg")
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    return root


@pytest.mark.parametrize("flags, per_subject", [([], 1), (["--images-per-subject", "1"], 1),
                                                (["--images-per-subject", "2"], 2)])
def test_dreambench_command_writes_what_the_converter_writes(tmp_path, capsys, flags, per_subject) -> None:
    from ipadapter.cli.main import main

    folder = _dreambench(tmp_path / "bench")
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "dreambench", str(folder), "--out", str(out), *flags]) == 0
    expected = from_dreambench(folder, tmp_path / "direct.jsonl", images_per_subject=per_subject)
    assert out.read_text() == expected.path.read_text()
    assert capsys.readouterr().out == f"wrote {out}: {len(expected.entries)} entries\n"


def test_dreambench_command_refuses_no_images_per_subject(tmp_path, capsys) -> None:
    from ipadapter.cli.main import main

    folder = _dreambench(tmp_path / "bench")
    assert main(["manifest", "dreambench", str(folder), "--out", str(tmp_path / "m.jsonl"),
                 "--images-per-subject", "0"]) == 2
    assert capsys.readouterr().err == "ipadapter: error: --images-per-subject must be at least 1, got 0\n"
    assert not (tmp_path / "m.jsonl").exists()
