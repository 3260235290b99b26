"""Data: manifests, shards, skipping, preprocessing, resumable streams; condition dropout rates."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter import IPAdapterError
from ipadapter.train import dropout
from ipadapter.train.data import (
    Batches, Decoder, IndexedStream, Record, ShardStream, SkipSample, center_crop, expand_shards, read_manifest,
    sdxl_time_ids,
)
from tests import factories


def test_manifest_paths_relative_to_its_folder_or_data_root(tmp_path) -> None:
    manifest = factories.write_images(tmp_path / "d", 2)
    records = read_manifest(manifest)
    assert records[0].image == tmp_path / "d" / "img0.png" and records[0].text == "a red square"
    moved = tmp_path / "elsewhere" / "m.jsonl"
    moved.parent.mkdir()
    moved.write_text(manifest.read_text())
    assert read_manifest(moved, data_root=str(tmp_path / "d"))[1].image == tmp_path / "d" / "img1.png"
    as_list = tmp_path / "d" / "list.json"
    as_list.write_text(json.dumps([json.loads(l) for l in manifest.read_text().splitlines()]))
    assert [r.image for r in read_manifest(as_list)] == [r.image for r in records]


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"image": "a.png", "text": "x"}\n', "entry 1 has no 'image_file' field"),
    ('{"image_file": "a.png"}\n', "no 'text' field"),
    ('["a.png"]', "is a str"),
    ('{"image_file": "a.png", "text": 3}\n', "must be strings"),
    ("{not json\n", "not valid JSON"),
    ('[{"image_file": "a.png", "text": "x"},\n oops]', "is not valid JSON: Expecting value at line 2"),
    ('{"image_file": "a.png", "text": "x", "ref_image_file": 3}\n', "ref_image_file must be a file name or a list of"),
    ('{"image_file": "a.png", "text": "x", "ref_image_file": ["r.png", ""]}\n', "ref_image_file must be a file name"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, content, message) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(IPAdapterError, match=message):
        read_manifest(path)


def test_a_sample_the_decoder_cannot_use_is_skipped_with_its_reason(tmp_path) -> None:
    image = tmp_path / "t.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(image)
    cases = [
        (Decoder(16), Record("a", None, image), "no caption"),
        (Decoder(16, references=2), Record("b", "x", image, refs=[image]), "not 2 reference image(s)"),
        (Decoder(16, references=2), Record("c", "x", image), "no reference images (2 needed)"),
        (Decoder(16, id_dim=4), Record("d", "x", image), "not 1 ID embedding(s)"),
    ]
    for decoder, record, reason in cases:
        with pytest.raises(SkipSample, match=f"^{reason.replace('(', '.').replace(')', '.')}$"):
            decoder(record)
    assert Decoder(16, need_text=False)(Record("e", None, image))["text"] == ""


def test_fewer_samples_than_processes_is_refused() -> None:
    with pytest.raises(IPAdapterError, match="^1 training samples cannot be split over 2 processes$"):
        IndexedStream([Record("a", "x", None)], rank=0, world=2)


def test_faceid_manifest_needs_id_embed_file(tmp_path) -> None:
    manifest = factories.write_images(tmp_path, 2)
    with pytest.raises(IPAdapterError, match="id_embed_file.*ArcFace"):
        read_manifest(manifest, need_id=True)


def test_no_shards_matched(tmp_path) -> None:
    with pytest.raises(IPAdapterError, match="no tar shards matched"):
        expand_shards(str(tmp_path / "data-{00000..00003}.tar"))


def test_shards_stream_skip_corrupt_and_resume_exactly(tmp_path) -> None:
    pattern = factories.write_shards(tmp_path / "shards", 10, per_shard=4, corrupt_every=5)
    shards = expand_shards(pattern)
    assert len(shards) == 3
    (tmp_path / "shards" / "00002.tar").write_bytes((tmp_path / "shards" / "00002.tar").read_bytes()[:700])  # truncated
    decode = Decoder(16)
    stream = ShardStream(shards, seed=1)
    batches = Batches(stream, decode, 3)
    first = [e["key"] for _ in range(3) for e in batches.next_batch()]
    state = stream.state_dict()
    following = [e["key"] for _ in range(3) for e in batches.next_batch()]
    assert batches.skipped["undecodable image"] >= 1
    again = ShardStream(shards, seed=1)
    again.load_state_dict(state)
    assert [e["key"] for _ in range(3) for e in Batches(again, decode, 3).next_batch()] == following
    assert len(set(first)) > 1


def test_shards_split_over_processes(tmp_path) -> None:
    shards = expand_shards(factories.write_shards(tmp_path, 8, per_shard=2))
    seen = []
    for rank in range(2):
        s = ShardStream(shards, rank=rank, world=2, seed=0, single_pass=True)
        while (r := s.next_record()) is not None:
            seen.append(r.key)
    assert sorted(seen) == [f"{i:09d}" for i in range(8)]
    one = ShardStream(shards[:1], rank=1, world=2, single_pass=True)  # fewer shards than processes: every 2nd sample
    assert [one.next_record().key, one.next_record()] == ["000000001", None]


@pytest.mark.parametrize("per_shard", [2, 3, 6])  # 3, 2 and 1 shards
def test_three_processes_read_every_sample_once(tmp_path, per_shard) -> None:
    """As many shards as processes: each reads its own; fewer: each reads all and keeps every world-th sample, rank r
    the (r+1)-th, (r+1+world)-th, ... in reading order."""
    world, shards = 3, expand_shards(factories.write_shards(tmp_path, 6, per_shard=per_shard))
    order = [r.key for r in iter(ShardStream(shards, seed=0, single_pass=True).next_record, None)]
    per_rank = [[r.key for r in iter(ShardStream(shards, rank=rank, world=world, seed=0, single_pass=True).next_record,
                                     None)] for rank in range(world)]
    assert sorted(k for keys in per_rank for k in keys) == sorted(order) == [f"{i:09d}" for i in range(6)]
    if len(shards) < world:
        assert per_rank == [order[rank::world] for rank in range(world)]
    else:  # whole shards: a rank's keys are one shard's consecutive keys
        assert sorted(sorted(keys) for keys in per_rank) == [[f"{i:09d}", f"{i + 1:09d}"] for i in (0, 2, 4)]


def test_tar_members_in_folders_and_folder_entries(tmp_path) -> None:
    """webdataset's keys: the member's path up to the first dot of its file name, folders included; folder entries
    of the tar are passed over, not the end of it."""
    from ipadapter.train.data import iter_tar_groups

    path = factories.write_tar(tmp_path / "s.tar", {"a": None, "a/x.y.jpg": b"1", "a/x.y.txt": b"one", "b": None,
                                                    "b/x.jpg": b"2", "x.JPG": b"3"})
    skipped = Counter()
    groups = list(iter_tar_groups(str(path), skipped))
    assert groups == [{"y.jpg": b"1", "y.txt": b"one", "__key__": b"a/x"}, {"jpg": b"2", "__key__": b"b/x"},
                      {"jpg": b"3", "__key__": b"x"}]
    assert not skipped


def _keys(stream: ShardStream, n: int) -> list[str]:
    return [stream.next_record().key for _ in range(n)]


@pytest.mark.parametrize("world, shard_count", [(1, 4), (2, 4), (2, 1)])  # (2, 1): both processes read one shard
def test_shuffle_buffer_shuffles_samples_once_per_epoch_and_resumes_exactly(tmp_path, world, shard_count) -> None:
    shards = expand_shards(factories.write_shards(tmp_path, 40, per_shard=10))[:shard_count]
    per_rank = 10 * shard_count // world
    for rank in range(world):
        def stream(buffer: int = 6, seed: int = 0) -> ShardStream:
            return ShardStream(shards, rank=rank, world=world, seed=seed, shuffle_buffer=buffer)

        plain, shuffled = _keys(stream(0), 3 * per_rank), _keys(stream(), 3 * per_rank)
        assert shuffled != plain and _keys(stream(), 3 * per_rank) == shuffled  # another order, the same for a seed
        assert _keys(stream(seed=1), per_rank) != shuffled[:per_rank]
        for epoch in range(3):  # every sample of this process once per epoch
            window = slice(epoch * per_rank, (epoch + 1) * per_rank)
            assert sorted(shuffled[window]) == sorted(plain[window]) and len(set(shuffled[window])) == per_rank
        buffered = []
        for cut in (0, 1, 5, per_rank - 1, per_rank, per_rank + 3, 2 * per_rank + 2):  # epoch ends included
            first = stream()
            _keys(first, cut)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
            buffered.append(len(state["buffer"]))
            resumed = stream()
            resumed.load_state_dict(state)
            assert _keys(resumed, 3 * per_rank - cut) == shuffled[cut:]
        assert max(buffered) == min(5, per_rank - 1)  # the resumed streams rebuilt a buffer


def test_shuffle_buffer_mixes_across_shards(tmp_path) -> None:
    shards = expand_shards(factories.write_shards(tmp_path, 40, per_shard=10))
    plain = _keys(ShardStream(shards, shuffle_buffer=0), 40)
    shuffled = _keys(ShardStream(shards, shuffle_buffer=25), 40)
    shard_of = {k: i // 10 for i, k in enumerate(plain)}  # the shard each key was read from, in reading order
    assert any(shard_of[k] >= 2 for k in shuffled[:10])  # a third shard's sample among the first ten drawn


def test_shuffle_buffer_resume_counts_a_damaged_shard_once(tmp_path) -> None:
    shards = expand_shards(factories.write_shards(tmp_path, 24, per_shard=8))
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:5000])  # truncated mid-shard
    full = ShardStream(shards, seed=0, shuffle_buffer=10)
    keys = _keys(full, 30)
    first = ShardStream(shards, seed=0, shuffle_buffer=10)
    _keys(first, 12)
    resumed = ShardStream(shards, seed=0, shuffle_buffer=10)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.skipped.update(first.skipped)  # as the trainer restores the counts
    assert _keys(resumed, 18) == keys[12:]
    assert resumed.skipped == full.skipped == {"unreadable shard": 2}


def test_shards_without_a_sample_are_refused_not_read_forever(tmp_path) -> None:
    """A pass over a process's shards that yields nothing would otherwise start the next epoch, and the next: the
    stream names the process, its shard count and what was wrong, whether the shards are empty or unreadable."""
    import tarfile

    for name in ("a.tar", "b.tar"):
        tarfile.open(tmp_path / name, "w").close()
    for name in ("c.tar", "d.tar"):
        (tmp_path / name).write_bytes(b"not a tar archive at all" * 40)
    empty = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(IPAdapterError, match=r"process 0 found no samples in a full pass over its 2 shard\(s\) "
                                             r"\(empty shards\)"):
        ShardStream(empty).next_record()
    with pytest.raises(IPAdapterError, match=r"process 1 found no samples .* its 1 shard\(s\) "
                                             r"\(\{'unreadable shard': 1\}\)"):
        ShardStream([str(tmp_path / "c.tar"), str(tmp_path / "d.tar")], rank=1, world=2, shuffle_buffer=3).next_record()
    assert ShardStream(empty, single_pass=True).next_record() is None, "one pass asked for: it ends, no error"
    good = expand_shards(factories.write_shards(tmp_path / "good", 1, per_shard=1))
    one = ShardStream([*empty, *good], shuffle_buffer=4)
    assert [one.next_record().key for _ in range(3)] == ["000000000"] * 3, "one sample is enough: every epoch yields it"


def test_manifest_stream_is_a_seeded_permutation_per_epoch_and_resumes(tmp_path) -> None:
    records = read_manifest(factories.write_images(tmp_path, 5))
    s = IndexedStream(records, seed=3)
    epoch0 = [s.next_record().key for _ in range(5)]
    assert sorted(epoch0) == ["1", "2", "3", "4", "5"]
    s.next_record()
    state = s.state_dict()
    rest = [s.next_record().key for _ in range(7)]
    t = IndexedStream(records, seed=3)
    t.load_state_dict(state)
    assert [t.next_record().key for _ in range(7)] == rest
    halves = [IndexedStream(records, rank=r, world=2, seed=3, single_pass=True) for r in range(2)]
    keys = [rec.key for h in halves for rec in iter(h.next_record, None)]
    assert sorted(keys) == sorted(epoch0)


def test_centre_crop_and_sdxl_conditioning() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels, original, crop = center_crop(image, 16)
    assert pixels.shape == (3, 16, 16) and original == (20, 40) and crop == (0, 8)
    assert torch.allclose(pixels[0], torch.ones(16, 16)) and torch.allclose(pixels[1], -torch.ones(16, 16))
    assert sdxl_time_ids([original], [crop], (16, 16)).tolist() == [[20, 40, 0, 8, 16, 16]]


def test_clip_sees_the_uncropped_image(tmp_path) -> None:
    """The reference script gives CLIP the whole image: a wide image's left edge reaches CLIP's input, not the VAE's."""
    from transformers import CLIPImageProcessor

    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 255, 255)  # white left third, cut off by the 20 px centre crop
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20}, do_center_crop=False)
    out = Decoder(20, proc)(read_manifest(_one(tmp_path, "wide.png"))[0])
    assert out["pixels"].max() < -0.99  # the VAE's crop is all black
    assert out["clip"].shape[-1] == 60 and out["clip"][0, :, :20].mean() > 1.0  # CLIP got the white part


def _one(tmp_path, name):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"image_file": name, "text": "x"}) + "\n")
    return path


def test_bad_id_embeddings_are_skipped(tmp_path) -> None:
    manifest = factories.write_images(tmp_path, 2, id_dim=8)
    np.save(tmp_path / "id1.npy", np.zeros(5, np.float32))
    decode = Decoder(16, None, id_dim=8)
    records = read_manifest(manifest, need_id=True)
    assert decode(records[0])["id"].shape == (8,)
    batches = Batches(IndexedStream(records, shuffle=False, single_pass=True), decode, 2)
    assert len(batches.next_batch()) == 1 and batches.skipped == {"ID embedding not 8 finite values": 1}


# ---- condition dropout ----------------------------------------------------------------------------------------------
def test_dropout_rates_one_draw_per_sample() -> None:
    """n = 400k draws; each rate within 5 binomial standard deviations (sd = sqrt(p(1-p)/n) ≈ 3.4e-4 for p = 0.05)."""
    n = 400_000
    drops = dropout.draw(n, 0.05, 0.05, 0.05, generator=torch.Generator().manual_seed(0))
    image_only = (drops.image & ~drops.text).float().mean().item()
    text_only = (drops.text & ~drops.image).float().mean().item()
    both = (drops.image & drops.text).float().mean().item()
    for rate, p in ((image_only, 0.05), (text_only, 0.05), (both, 0.05),
                    (drops.image.float().mean().item(), 0.10), (drops.text.float().mean().item(), 0.10)):
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (rate, p)


def test_dropped_values_per_variant() -> None:
    mask = torch.tensor([True, False, True])
    embeds = torch.randn(3, 4)
    out = dropout.replace_rows(embeds, mask, 0.0)  # global: zero embedding
    assert out[0].abs().sum() == 0 and torch.equal(out[1], embeds[1]) and out[2].abs().sum() == 0
    patches = torch.randn(3, 5, 6)
    uncond = torch.randn(5, 6)  # patch: the encoder's output on zero pixels, computed once
    out = dropout.replace_rows(patches, mask, uncond)
    assert torch.equal(out[0], uncond) and torch.equal(out[1], patches[1])
    assert dropout.drop_texts(["a", "b", "c"], mask) == ["", "b", ""]


def test_a_manifest_of_only_bad_samples_stops_with_a_sentence(tmp_path) -> None:
    manifest = factories.write_images(tmp_path, 0, corrupt=1, missing=2)
    batches = Batches(IndexedStream(read_manifest(manifest)), Decoder(16), 2)
    with pytest.raises(IPAdapterError, match=r"no usable sample in 4 tries \(skipped 4 sample\(s\): .*missing image file"):
        batches.next_batch()


def test_id_embeddings_from_npy_and_pt(tmp_path) -> None:
    from ipadapter.train.data import SkipSample, load_id_embed

    value = torch.randn(8)
    np.save(tmp_path / "a.npy", value.numpy())
    torch.save(value, tmp_path / "b.pt")
    assert torch.equal(load_id_embed(tmp_path / "a.npy", 8), value)
    assert torch.equal(load_id_embed(tmp_path / "b.pt", 8), value)
    with pytest.raises(SkipSample, match="missing ID embedding file"):
        load_id_embed(tmp_path / "c.npy", 8)


@pytest.mark.parametrize("members, caption", [
    ({"txt": b"a red circle", "json": b'{"caption": "not this"}'}, "a red circle"),  # the .txt wins
    ({"json": b'{"caption": "a blue ring", "key": "7"}'}, "a blue ring"),           # img2dataset without .txt
    ({"json": b'{"text": "a green cross"}'}, "a green cross"),
    ({"json": b'{"caption": 5}'}, None),                                             # not text: no caption
    ({"json": b"[1, 2]"}, None),
    ({"json": b"\xff\xfe{"}, None),
    ({}, None),
])
def test_a_shard_sample_caption_from_txt_else_json(members, caption) -> None:
    from ipadapter.train.data import shard_record

    record = shard_record({"__key__": b"k", "jpg": b"pixels", "npy": b"x", **members}, need_id=False)
    assert (record.key, record.text, record.image) == ("k", caption, b"pixels")
    assert record.id_embeds == []  # ID embeddings are read only for the face variants


@pytest.mark.parametrize("dropped", [0.0, torch.full((3,), 2.0)])
def test_replaced_rows_keep_the_values_dtype(dropped) -> None:
    """A bf16 batch stays bf16 whether the dropped row is a number or a float32 tensor (no silent promotion)."""
    values = torch.ones(4, 3, dtype=torch.bfloat16)
    out = dropout.replace_rows(values, torch.tensor([True, False, True, False]), dropped)
    assert out.dtype == torch.bfloat16
    expected = torch.ones(4, 3)
    expected[[0, 2]] = torch.as_tensor(dropped, dtype=torch.float32)
    assert torch.equal(out.float(), expected)


@pytest.mark.parametrize("members, need_id, refs, ids", [
    ({"jpg": b"T", "ref.png": b"R"}, False, [b"R"], []),
    ({"jpg": b"T", "ref0.jpg": b"R0", "ref1.webp": b"R1", "ref3.jpg": b"gap"}, False, [b"R0", b"R1"], []),
    ({"jpg": b"T", "face.jpg": b"F"}, False, [b"F"], []),  # the other field serves when the first is absent
    ({"jpg": b"T", "face.jpg": b"F", "ref.jpg": b"R"}, False, [b"R"], []),
    ({"jpg": b"T", "face.jpg": b"F", "ref.jpg": b"R", "npy": b"I"}, True, [b"F"], [("npy", b"I")]),
    ({"jpg": b"T", "face0.jpg": b"F0", "face1.png": b"F1", "id0.npy": b"I0", "id1.pt": b"I1"}, True,
     [b"F0", b"F1"], [("npy", b"I0"), ("pt", b"I1")]),
    ({"jpg": b"T", "npy": b"I", "id0.npy": b"I0"}, True, [], [("npy", b"I")]),
    ({"jpg": b"T", "npy": b"I"}, False, [], []),
])
def test_shard_members_name_references_and_id_embeddings(members, need_id, refs, ids) -> None:
    """docs/training.md: references are `{key}.ref.<ext>` (one) or `ref0`, `ref1`, ... (several, up to the first
    missing number); FaceID reads `face` crops first and `{key}.npy` or `id0`, `id1`, ... embeddings."""
    from ipadapter.train.data import shard_record

    record = shard_record({**members, "__key__": "k/0001".encode()}, need_id=need_id)
    assert (record.key, record.image, record.refs, record.id_embeds) == ("k/0001", b"T", refs, ids)


def test_shard_patterns_take_brace_ranges_globs_and_plain_names(tmp_path) -> None:
    """Brace ranges as webdataset expands them, glob wildcards (`*`, `?`, `[...]`) as the shell does, a plain name when
    the file exists; the union sorted once, names that match nothing dropped."""
    for name in ("a-0.tar", "a-1.tar", "a-2.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    t = str(tmp_path)
    assert expand_shards(f"{t}/*.tar") == [f"{t}/a-0.tar", f"{t}/a-1.tar", f"{t}/a-2.tar", f"{t}/b.tar"]
    assert expand_shards(f"{t}/a-?.tar") == expand_shards(f"{t}/a-[0-2].tar") == [f"{t}/a-{i}.tar" for i in range(3)]
    assert expand_shards(f"{t}/a-{{2..4}}.tar") == [f"{t}/a-2.tar"]
    assert expand_shards(f"{t}/{{b,a-1,a-*}}.tar") == [f"{t}/a-0.tar", f"{t}/a-1.tar", f"{t}/a-2.tar", f"{t}/b.tar"]


def test_a_faceid_shard_stream_reads_face_crops_and_embeddings(tmp_path) -> None:
    """The stream passes the run's kind on: a FaceID stream reads the face crop and the ID embedding of a sample that
    also names a reference; any other stream reads the reference and no embedding."""
    factories.write_tar(tmp_path / "s.tar", {"000.jpg": b"T", "000.txt": b"a", "000.face.jpg": b"F",
                                             "000.ref.jpg": b"R", "000.npy": b"I"})
    face = ShardStream([str(tmp_path / "s.tar")], need_id=True, single_pass=True).next_record()
    plain = ShardStream([str(tmp_path / "s.tar")], single_pass=True).next_record()
    assert (face.refs, face.id_embeds) == ([b"F"], [("npy", b"I")])
    assert (plain.refs, plain.id_embeds) == ([b"R"], [])
