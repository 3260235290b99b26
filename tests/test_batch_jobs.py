"""Manifest jobs: identity by content, one-line reasons for bad lines, batches fixed by the manifest; the shard split."""

from __future__ import annotations

import json

import pytest

from ipadapter.batch.jobs import OPTIONS, batches, read_jobs
from ipadapter.batch.shards import Shard
from ipadapter.errors import IPAdapterError
from ipadapter.request import MODIFIERS
from tests import factories

DEFAULTS = {"image": [], "prompt": "", "negative_prompt": "", "scale": 1.0, "seed": 0, "num_images": 1, "steps": None,
            "guidance": None, "width": None, "height": None, "mask": [], "start": 0.0, "end": 1.0, "preset": None,
            "combine": "concat", "image_weight": None, "negative_image": None, "noise": None, "embeds_scaling": "v",
            "crop": "center", "tiles": False, "lora_scale": 1.0, "content_subtract": None, "content_strength": 1.0}


def _geometry() -> tuple[int, tuple[int, int]]:
    return 8, (64, 64)


def _read(tmp_path, lines: list) -> object:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return read_jobs(path, DEFAULTS, ["0", "1"], _geometry)


@pytest.fixture()
def refs(tmp_path):
    for i in range(3):
        factories.reference_image(i).save(tmp_path / f"r{i}.png")
    return tmp_path


def test_defaults_cover_every_option() -> None:
    assert set(DEFAULTS) == set(OPTIONS)


def test_a_job_is_its_content_not_its_line(refs) -> None:
    a, b = {"image": "r0.png", "seed": 3}, {"image": "r1.png", "prompt": "x", "seed": 3}
    first = _read(refs, [a, b])
    second = _read(refs, ["", b, a, a])  # reordered, a blank line, a repeated job
    assert {j.key for j in first.jobs} == {j.key for j in second.jobs} and len(second.jobs) == 2
    assert [j.line for j in second.jobs] == [2, 3] and not second.failures
    # hyphenated keys are the same options; a changed setting is another job
    assert _read(refs, [{"image": "r0.png", "seed": 3, "num-images": 1}]).jobs[0].key == first.jobs[0].key
    assert _read(refs, [{"image": "r0.png", "seed": 4}]).jobs[0].key != first.jobs[0].key
    job = _read(refs, [{"id": "cat", "image": "r0.png", "seed": 7, "num_images": 3}]).jobs[0]
    assert job.files == ["cat-0.png", "cat-1.png", "cat-2.png"] and job.seeds == [7, 8, 9]


def test_a_job_is_the_same_from_any_working_directory(refs, monkeypatch) -> None:
    """docs/scale.md: a rerun skips finished jobs. The manifest named from its own folder or from the one above reads
    the same references (joined to the manifest's folder) and must give the same keys."""
    (refs / "jobs.jsonl").write_text(json.dumps({"image": "r0.png", "mask": ["r1.png"], "negative_image": "r2.png"}))
    keys = []
    for cwd, manifest in ((refs, "jobs.jsonl"), (refs.parent, f"{refs.name}/jobs.jsonl")):
        monkeypatch.chdir(cwd)
        job = read_jobs(manifest, DEFAULTS, ["0"], _geometry).jobs[0]
        assert (cwd / job.settings["image"][0]).resolve() == (refs / "r0.png").resolve()
        keys.append(job.key)
    assert keys[0] == keys[1]


BAD = {
    "not JSON": ("{oops", "not JSON (Expecting property name enclosed in double quotes at column 2)"),
    "not an object": ("[1]", "not a JSON object"),
    "unknown option": ({"image": "r0.png", "colour": 1},
                       f"unknown option 'colour'; valid: id, adapter, {', '.join(OPTIONS)}"),
    "missing reference": ({"image": "nope.png"}, "reference image not found: {refs}/nope.png"),
    "missing negative image": ({"image": "r0.png", "negative_image": "nope.png"},
                               "reference image not found: {refs}/nope.png"),
    "missing mask": ({"image": "r0.png", "mask": "nope.png"}, "mask not found: {refs}/nope.png"),
    "not an image": ({"image": "jobs.jsonl"},
                     "cannot read {refs}/jobs.jsonl as an image (UnidentifiedImageError: cannot identify image file "
                     "'{refs}/jobs.jsonl')"),
    "nothing asked": ({"seed": 1}, "give image, prompt, or both"),
    "string scale": ({"image": "r0.png", "scale": "1"}, "scale must be a number, got '1'"),
    "infinite scale": ('{"image": "r0.png", "scale": Infinity}', "scale must be a finite number, got inf"),
    "bool seed": ({"image": "r0.png", "seed": True}, "seed must be a whole number, got True"),
    "seed too large": ({"image": "r0.png", "seed": 2**64 - 1, "num_images": 2},
                       f"seed + num_images - 1 must lie in 0 to 2**64-1, got seed {2**64 - 1}"),
    "bad window": ({"image": "r0.png", "start": 0.8, "end": 0.2}, "start (0.8) must not be after end (0.2)"),
    "mask count": ({"image": "r0.png", "mask": ["r1.png", "r2.png"]},
                   "got 2 mask(s) for 1 image(s); give one per image"),
    "combine one image": ({"image": "r0.png", "combine": "average"},
                          "combine average merges several images; give at least two"),
    "unattached adapter": ({"image": "r0.png", "adapter": "7"},
                           "adapter '7' is not attached; attached (--adapter order): 0, 1"),
    "size step": ({"image": "r0.png", "width": 30},
                  "--width 30 does not fit this base model: sizes are multiples of 8; try 24 or 32"),
    "bad id": ({"id": "../x", "image": "r0.png"},
               "id must be 1 to 100 letters, digits, '.', '_' or '-' (not first), got '../x'"),
    "negative content strength": ({"image": "r0.png", "content_subtract": "a dog", "content_strength": -1},
                                  "content_strength must not be negative, got -1.0"),
    "content words not text": ({"image": "r0.png", "content_subtract": 3}, "content_subtract must be a string, got 3"),
    "image not a path": ({"image": 3}, "image must be a path or a list of paths"),
    "a number among images": ({"image": ["r0.png", 3]}, "image must be a path or a list of paths"),
    "mask not a path": ({"image": "r0.png", "mask": 5}, "mask must be a path or a list of paths"),
    "one weight, not a list": ({"image": ["r0.png", "r1.png"], "image_weight": 0.5},
                               "image_weight must be a list of numbers, one per image"),
    "a weight that is text": ({"image": ["r0.png", "r1.png"], "image_weight": [1, "a"]},
                              "image_weight must be a number, got 'a'"),
    "weight count": ({"image": ["r0.png", "r1.png"], "image_weight": [1]},
                     "got 1 image_weight for 2 image; give one per image"),
    "tiles as text": ({"image": "r0.png", "tiles": "yes"}, "tiles must be true or false, got 'yes'"),
    "no steps": ({"image": "r0.png", "steps": 0}, "steps must be at least 1, got 0"),
    "no images": ({"image": "r0.png", "num_images": -2}, "num_images must be at least 1, got -2"),
    "fractional steps": ({"image": "r0.png", "steps": 2.5}, "steps must be a whole number, got 2.5"),
    "fractional height": ({"image": "r0.png", "height": 64.5}, "height must be a whole number, got 64.5"),
    "guidance as text": ({"image": "r0.png", "guidance": "high"}, "guidance must be a number, got 'high'"),
    "start as text": ({"image": "r0.png", "start": "0"}, "start must be a number, got '0'"),
    "lora scale as text": ({"image": "r0.png", "lora_scale": "1"}, "lora_scale must be a number, got '1'"),
    "negative guidance": ({"image": "r0.png", "guidance": -1}, "guidance must not be negative, got -1.0"),
    "negative scale": ({"image": "r0.png", "scale": -0.5}, "scale must not be negative, got -0.5"),
    "negative seed": ({"image": "r0.png", "seed": -1}, "seed + num_images - 1 must lie in 0 to 2**64-1, got seed -1"),
    "tiles with a mask": ({"image": "r0.png", "tiles": True, "mask": "r1.png"},
                          "tiles makes its own per-tile masks; do not combine it with mask"),
    "negative image and noise": ({"image": "r0.png", "negative_image": "r1.png", "noise": "gaussian"},
                                 "give negative_image or noise, not both"),
    "bad noise": ({"image": "r0.png", "noise": "gaussian:x"},
                  "noise= takes TYPE:STRENGTH such as dissolve:0.4, got 'gaussian:x'"),
    "prompt not text": ({"prompt": 5}, "prompt must be a string, got 5"),
    "strength without content words": ({"image": "r0.png", "content_strength": 0.5},
                                       "content_strength changes what content_subtract does, and this job has none"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_line_is_a_one_line_failure_and_the_rest_runs(refs, case) -> None:
    line, message = BAD[case]
    found = _read(refs, [{"image": "r0.png"}, line, {"image": "r1.png"}])
    assert [j.line for j in found.jobs] == [1, 3] and len(found.failures) == 1
    failure = found.failures[0]
    assert failure.line == 2 and failure.error == message.replace("{refs}", str(refs))
    named = isinstance(line, dict) and isinstance(line.get("id"), str)
    assert failure.id == (line["id"] if named else None)


# A job's own image-side keys (values other than the flags' defaults) with no image: nothing for them to act on.
IMAGE_SIDE = {"negative_image": "r1.png", "start": 0.2, "end": 0.8, "preset": "ease in", "embeds_scaling": "kv",
              "crop": "top", "tiles": True, "scale": 0.5, "mask": "r1.png", "image_weight": [0.5], "combine": "add",
              "noise": "fade:0.5", "content_subtract": "a dog"}


@pytest.mark.parametrize("key", list(IMAGE_SIDE))
def test_an_image_side_key_on_a_job_without_an_image_fails_that_job_alone(refs, key) -> None:
    found = _read(refs, [{"image": "r0.png"}, {"prompt": "a cat", key: IMAGE_SIDE[key]}, {"prompt": "a dog"}])
    assert [j.line for j in found.jobs] == [1, 3]
    assert [(f.line, f.error) for f in found.failures] == [(2, f"{key} changes the image prompt, and this job has no "
                                                               "image")]


def test_the_runs_image_side_flags_are_no_text_only_jobs_mistake(refs) -> None:
    """The flags are every job's defaults: a text-only job among jobs with images takes them without failing."""
    path = refs / "jobs.jsonl"
    path.write_text(json.dumps({"image": "r0.png"}) + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
    found = read_jobs(path, {**DEFAULTS, "scale": 0.5, "start": 0.2, "crop": "top"}, ["0"], _geometry)
    assert [j.line for j in found.jobs] == [1, 2] and not found.failures


def test_a_failed_line_keeps_its_id_and_null_keeps_the_default(refs) -> None:
    found = _read(refs, [{"id": "cat", "image": "nope.png"}, {"image": "r0.png", "scale": None, "adapter": None}])
    assert [(f.line, f.id) for f in found.failures] == [(1, "cat")]
    (job,) = found.jobs
    assert job.settings == {**DEFAULTS, "image": [str(refs / "r0.png")]} and job.adapter is None
    assert len(job.id) == 16 and job.key.startswith(job.id)  # no id: the first 16 hex digits of the key
    assert _read(refs, [{"image": "r0.png", "adapter": 0}]).failures[0].error.startswith(
        "adapter 0 is not attached; attached (--adapter order): 0, 1")
    second = _read(refs, [{"image": "r0.png", "adapter": "1"}]).jobs[0]
    assert second.adapter == "1" and second.key != job.key and second.settings == job.settings


def test_values_at_their_limits_are_jobs_with_the_flags_types(refs) -> None:
    """The last seed a job may start from, one step, scale 0, two images combined with weights, tiles, noise."""
    lines = [
        {"image": "r0.png", "seed": 2**64 - 2, "num_images": 2, "steps": 1, "scale": 0, "guidance": 0},
        {"image": ["r0.png", "r1.png"], "combine": "average", "image_weight": [1, 0.5], "start": 0, "end": 1},
        {"image": "r0.png", "tiles": True, "noise": "gaussian:0.3", "height": 64.0, "lora_scale": 2},
        {"image": "r0.png", "negative_image": "r1.png", "mask": "r2.png"},
    ]
    found = _read(refs, lines)
    assert not found.failures, found.failures
    first, second, third, fourth = (j.settings for j in found.jobs)
    assert found.jobs[0].seeds == [2**64 - 2, 2**64 - 1]
    assert (first["steps"], first["scale"], first["guidance"]) == (1, 0.0, 0.0)
    assert second["image_weight"] == [1.0, 0.5] and all(type(w) is float for w in second["image_weight"])
    assert (type(second["start"]), type(third["lora_scale"]), type(third["height"])) == (float, float, int)
    assert third["tiles"] is True and third["noise"] == "gaussian:0.3"
    assert fourth["negative_image"] == str(refs / "r1.png") and fourth["mask"] == [str(refs / "r2.png")]


def test_an_id_taken_by_another_job_fails_the_later_line(refs) -> None:
    found = _read(refs, [{"id": "a", "image": "r0.png"}, {"id": "a", "image": "r1.png"}])
    assert [j.line for j in found.jobs] == [1]
    assert [(f.line, f.id, f.error) for f in found.failures] == [(2, "a", "id 'a' already names the job of line 1")]


def test_a_jobs_key_does_not_depend_on_the_order_its_options_are_listed_in(refs) -> None:
    """A rerun by a version that lists the options in another order still finds the jobs it finished."""
    (refs / "jobs.jsonl").write_text(json.dumps({"image": "r0.png", "seed": 3, "prompt": "a cat"}) + "\n")
    keys = [read_jobs(refs / "jobs.jsonl", defaults, ["0"], _geometry).jobs[0].key
            for defaults in (DEFAULTS, dict(reversed(DEFAULTS.items())))]
    assert keys[0] == keys[1]


def test_a_size_given_in_part_is_completed_from_the_bases_aspect_and_nothing_else_is_added(refs) -> None:
    """The stand-in base is 64 × 64 with steps of 8: a width of 32 alone gets a height of 32."""
    (job,) = _read(refs, [{"image": "r0.png", "width": 32}]).jobs
    assert (job.settings["width"], job.settings["height"]) == (32, 32) and set(job.settings) == set(OPTIONS)
    (job,) = _read(refs, [{"image": "r0.png", "width": 32, "height": 48}]).jobs
    assert (job.settings["width"], job.settings["height"]) == (32, 48) and set(job.settings) == set(OPTIONS)


def test_a_manifest_that_is_not_utf8_is_refused_with_the_line_of_its_first_bad_byte(tmp_path) -> None:
    path = tmp_path / "jobs.jsonl"
    data = b'{"prompt": "a cat"}\n{"prompt": "caf\xe9"}\n'  # Latin-1's é
    path.write_bytes(data)
    with pytest.raises(IPAdapterError) as err:
        read_jobs(path, DEFAULTS, ["0"], _geometry)
    assert str(err.value) == f"manifest {path} is not UTF-8 text (byte {data.index(0xE9)}, line 2); save it as UTF-8"


def test_an_empty_manifest_is_a_user_error(tmp_path) -> None:
    (tmp_path / "jobs.jsonl").write_text("\n\n")
    with pytest.raises(IPAdapterError, match="no jobs"):
        read_jobs(tmp_path / "jobs.jsonl", DEFAULTS, ["0"], _geometry)


def test_batches_hold_one_group_each_in_manifest_order(refs) -> None:
    lines = [{"image": f"r{i % 3}.png", "seed": i, "prompt": f"p{i}"} for i in range(5)]
    lines.insert(2, {"image": "r0.png", "scale": 0.5})  # another group
    lines.append({"image": ["r0.png", "r1.png"], "seed": 9})  # two references: another group
    jobs = _read(refs, lines).jobs
    plan = batches(jobs, 2)
    assert [[j.line for j in b] for b in plan] == [[1, 2], [4, 5], [6], [3], [7]]
    for batch in plan:
        assert len({j.group for j in batch}) == 1
    tiled = _read(refs, [{"image": "r0.png", "tiles": True}, {"image": "r1.png", "tiles": True}]).jobs
    assert [len(b) for b in batches(tiled, 4)] == [1, 1]  # a tile count per reference: never shared


def test_shards_split_by_position_and_cover_everything_once() -> None:
    items = list(range(11))
    shards = []
    for index in range(3):
        shard = Shard()
        shard.index, shard.count = index, 3
        shards.append(shard.mine(items))
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7, 10]


@pytest.mark.parametrize("modifier", MODIFIERS, ids=lambda m: m[1])
def test_a_modifier_without_its_option_is_refused_by_generate_and_by_a_manifest_alike(refs, capsys, monkeypatch,
                                                                                       modifier) -> None:
    """One rule (`request.MODIFIERS`) for both: the command line names the flags, a manifest job its keys."""
    import ipadapter.loading
    from ipadapter.cli.main import main

    flag, name, default, needed_flag, needed = modifier
    monkeypatch.setattr(ipadapter.loading, "load_prompter", lambda **_: pytest.fail("a model was loaded"))
    value = default + 0.5
    assert main(["generate", "--image", str(refs / "r0.png"), flag, str(value), "--out", str(refs / "o.png")]) == 2
    assert capsys.readouterr().err == (f"ipadapter: error: {flag} changes what {needed_flag} does, and no "
                                       f"{needed_flag} was given\n")
    found = _read(refs, [{"image": "r0.png", name: value}, {"image": "r0.png", name: value, needed: "a dog"}])
    assert [f.error for f in found.failures] == [f"{name} changes what {needed} does, and this job has none"]
    assert [j.line for j in found.jobs] == [2]


def test_unnamed_jobs_under_several_adapters_fail_in_line_order_among_the_other_failures(refs) -> None:
    """errors.jsonl lists failures by manifest line, whichever check found them."""
    from ipadapter.batch.jobs import require_adapter_names

    found = _read(refs, [{"image": "r0.png"}, "not json", {"image": "r1.png", "adapter": "1"},
                         {"image": "r2.png"}, {"prompt": "text only"}])
    checked = require_adapter_names(found, ["0", "1"])
    why = ('several adapters are attached (0, 1 in --adapter order): give this job an "adapter" key naming the one '
           "its images are for")
    assert [(f.line, f.error) for f in checked.failures] == [
        (1, why), (2, "not JSON (Expecting value at column 1)"), (4, why)]
    assert [j.line for j in checked.jobs] == [3, 5]
    assert require_adapter_names(found, ["0"]) is found  # one adapter: every job uses it


class _Launched:
    """Stands in for `AccelerateShard`, which needs the processes `accelerate launch` starts."""


@pytest.mark.parametrize(("world", "several"), [(None, False), ("1", False), ("2", True), ("8", True)])
def test_a_process_is_a_shard_of_an_accelerate_run_only_when_launched_as_several(world, several, monkeypatch) -> None:
    from ipadapter.batch import accelerated, launch

    monkeypatch.setattr(accelerated, "AccelerateShard", _Launched)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    shard = launch.current()
    assert isinstance(shard, _Launched) if several else type(shard) is Shard


def test_several_processes_without_accelerate_is_one_sentence_and_other_missing_modules_propagate(monkeypatch) -> None:
    import sys

    from ipadapter.batch import launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delitem(sys.modules, "ipadapter.batch.accelerated", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed: importing it fails
    with pytest.raises(IPAdapterError) as err:
        launch.current()
    assert str(err.value) == "a run over several processes needs accelerate: pip install 'ipadapter[train]'"
    monkeypatch.setitem(sys.modules, "ipadapter.batch.accelerated", None)  # a module of ours missing: a bug, kept
    with pytest.raises(ModuleNotFoundError) as missing:
        launch.current()
    assert missing.value.name == "ipadapter.batch.accelerated"
