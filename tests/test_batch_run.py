"""The batch runner's parts that no whole run can show apart: merging the prompts of a batch's jobs into one (the
row layout `runtime.Reference` documents), the leftovers of a killed run removed before a new one, and the overall
count the main process of a sharded run shows."""

from __future__ import annotations

import json

import pytest
import torch

from ipadapter.batch.run import merge, remove_partial_files
from ipadapter.runtime import AdapterPrompt, Reference


def _prompt(seed: int, references: int = 1, uncond: bool = True) -> dict[str, AdapterPrompt]:
    g = torch.Generator().manual_seed(seed)
    refs = [Reference(torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g) if uncond else None,
                      weight=0.5 + i) for i in range(references)]
    return {"0": AdapterPrompt(refs, scale=0.7, start=0.1)}


def test_merged_references_hold_one_row_per_job_in_job_order() -> None:
    prompts = [_prompt(seed, references=2) for seed in (1, 2, 3)]
    (name, merged), = merge(prompts).items()
    assert name == "0" and (merged.scale, merged.start) == (0.7, 0.1)
    for i, ref in enumerate(merged.references):
        assert torch.equal(ref.cond, torch.cat([p["0"].references[i].cond for p in prompts]))
        assert torch.equal(ref.uncond, torch.cat([p["0"].references[i].uncond for p in prompts]))
        assert ref.weight == 0.5 + i


def test_references_without_unconditional_tokens_stay_without() -> None:
    (merged,) = merge([_prompt(1, uncond=False), _prompt(2, uncond=False)]).values()
    assert merged.references[0].uncond is None and merged.references[0].cond.shape[0] == 2


def test_text_only_jobs_merge_to_no_prompt_and_unequal_reference_counts_are_a_bug() -> None:
    assert merge([{}, {}]) == {}
    with pytest.raises(RuntimeError) as err:
        merge([_prompt(1, references=2), _prompt(2, references=1)])
    assert str(err.value) == "jobs of one group must have as many references each"


def test_a_killed_runs_temporary_files_are_removed_and_nothing_else(tmp_path) -> None:
    """`ipadapter.atomic` writes `<name>` through `.<name>.tmp-<pid>` beside it; a killed process leaves those."""
    records = tmp_path / ".records"
    records.mkdir()
    stale = [tmp_path / ".a-0.png.tmp-123", records / ".k.json.tmp-9"]
    kept = [tmp_path / "a-0.png", tmp_path / ".hidden", tmp_path / "b.tmp-1", records / "k.json", tmp_path / "run.json"]
    for path in stale + kept:
        path.write_bytes(b"x")
    remove_partial_files(tmp_path)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)


def _shards(count: int) -> list:
    from ipadapter.batch.shards import Shard

    shards = []
    for index in range(count):
        shard = Shard()
        shard.index, shard.count = index, count
        shards.append(shard)
    return shards


def test_the_main_process_shows_the_count_of_every_process(tmp_path) -> None:
    """Each process writes its own count; the main one's bar starts at what earlier runs finished and adds up every
    count it can read (a process that has not written yet counts 0); the final count replaces it at the end."""
    from ipadapter.batch.shards import Progress

    first, second, third = _shards(3)
    main = Progress(tmp_path, first, total=20, done=3, desc="generating")
    assert main.done == 3 and main.bar.unit == "img" and not main.bar.disable
    third_bar = Progress(tmp_path, third, total=20, done=3, desc="generating")
    assert third_bar.bar.disable  # only the main process shows a bar
    third_bar.advance(4)
    third_bar.advance(2)
    main.advance(1)
    assert main.done == 3 + 1 + 6  # the second process has written nothing yet
    assert [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 2)] == [{"done": 1}, {"done": 6}]
    Progress(tmp_path, second, total=20, done=3, desc="generating").advance(5)
    main.advance(0)
    assert main.done == 3 + 1 + 5 + 6
    main.close(17)
    assert main.done == 17
    hidden = Progress(tmp_path / "other", _shards(1)[0], total=2, done=0, desc="x", show=False)
    assert hidden.bar.disable
