"""Aggregation over the samples on disk, with injected feature networks (FID, LPIPS, face ID) and a tiny judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipadapter.evaluate import extractors, metrics
from ipadapter.evaluate.judges import ClipJudge
from ipadapter.evaluate.manifests import read_manifest, write_manifest
from ipadapter.evaluate.runner import Plan, load_samples, sample_path
from ipadapter.evaluate.scoring import Toolbox, build_toolbox, score_run
from tests import factories

PLAN = Plan(("ip",), (1.0,), samples=2, seed=0, empty_prompt=False, settings={})


@pytest.fixture
def run_dir(tmp_path):
    """Three references; sample 0 is a copy of its reference, sample 1 another random image."""
    records = []
    for i in range(3):
        factories.reference_image(i, 32).save(tmp_path / f"r{i}.png")
        records.append({"image_file": f"r{i}.png", "text": "a red circle"})
        for k, image in enumerate((factories.reference_image(i, 32), factories.reference_image(100 + i, 32))):
            sample_path(tmp_path, "ip", 1.0, i, k).parent.mkdir(parents=True, exist_ok=True)
            image.save(sample_path(tmp_path, "ip", 1.0, i, k))
    return tmp_path, read_manifest(write_manifest(tmp_path / "m.jsonl", records)).entries


def _features(images) -> np.ndarray:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with torch.no_grad():
        return net(extractors.normalized(images, 32, (0.5,) * 3, (0.5,) * 3)).numpy()


def test_row_aggregates_each_metric_as_its_definition(run_dir) -> None:
    out, entries = run_dir
    net = torch.nn.Conv2d(3, 4, 3)
    box = Toolbox(judge=ClipJudge.load(factories.save_judge(out / "judge")), inception=_features,
                  lpips=extractors.feature_distance(net, size=32), dino=lambda ims: torch.from_numpy(_features(ims)))
    row = score_run(PLAN, entries, out, "ip", 1.0, box, chunk=2)
    gens = [im for e in entries for im in load_samples(PLAN, e, "ip", 1.0, out)]
    refs = [e.image() for e in entries]
    clip_i = metrics.clip_i(box.judge, gens, refs, per_reference=2)
    assert clip_i[0::2].min() > 0.999 and row["clip_i"] == pytest.approx(float(clip_i.mean()), abs=1e-6)
    cos = metrics.clip_t(box.judge, gens, ["a red circle"] * 3, per_text=2)
    assert row["clip_t_cos"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert row["clip_t"] == pytest.approx(float(metrics.clip_score(cos).mean()), abs=1e-6)
    assert row["fid"] == pytest.approx(metrics.fid(_features(gens), _features(refs)), rel=1e-6)
    groups = [gens[2 * i : 2 * i + 2] for i in range(3)]
    assert row["lpips"] == pytest.approx(metrics.diversity(groups, box.lpips), rel=1e-6)
    assert row["dino_i"] == pytest.approx(float(metrics.embedding_cosine(box.dino, gens, refs, 2).mean()), abs=1e-6)
    assert (row["references"], row["samples"]) == (3, 6)


def test_generations_without_a_face_are_counted_not_averaged(run_dir) -> None:
    out, entries = run_dir

    def faces(images):
        rows = torch.ones(len(images), 4)
        if len(images) > 1:
            rows[1] = float("nan")  # the second image of each call has "no face"
        return rows

    row = score_run(PLAN, entries, out, "ip", 1.0, Toolbox(face=faces), chunk=2)
    # chunk 1 (references 0, 1): generation 1 has no face, and reference 1 has none, so neither of its samples can
    # be compared; chunk 2 (reference 2): its second generation has no face. 4 of 6 missing, both chunks counted.
    assert row["face_id"] == pytest.approx(1.0) and row["face_missing"] == 4


def test_attribute_agreement_asks_about_each_sample_of_a_reference_with_attributes(tmp_path) -> None:
    """Only references with `attrs` are judged, each of its samples against them; chunks are weighted by samples."""
    records = []
    for i in range(3):
        factories.reference_image(i, 32).save(tmp_path / f"r{i}.png")
        records.append({"image_file": f"r{i}.png", "text": "x", **({"attrs": {"colour": f"c{i}"}} if i != 1 else {})})
        for k in range(2):
            sample_path(tmp_path, "ip", 1.0, i, k).parent.mkdir(parents=True, exist_ok=True)
            factories.reference_image(10 * i + k, 32).save(sample_path(tmp_path, "ip", 1.0, i, k))
    entries = read_manifest(write_manifest(tmp_path / "m.jsonl", records)).entries
    asked = []

    class Judge:
        def accuracy(self, images, attrs):
            asked.extend((np.asarray(im).tobytes(), a["colour"]) for im, a in zip(images, attrs))
            return {"colour": float(len(asked) == 2), "all": 0.5}

    row = score_run(PLAN, entries, tmp_path, "ip", 1.0, Toolbox(attributes=Judge()), chunk=2)
    expected = [(np.asarray(factories.reference_image(10 * i + k, 32)).tobytes(), f"c{i}") for i in (0, 2) for k in (0, 1)]
    assert asked == expected
    assert row["attributes"] == {"colour": 0.5, "all": 0.5}  # chunk means 1.0 and 0.0, two samples each


def test_fid_of_one_reference_is_not_computed(run_dir) -> None:
    """A covariance needs two references: with one, the row says None rather than a number from a singular fit."""
    out, entries = run_dir
    assert score_run(PLAN, entries[:1], out, "ip", 1.0, Toolbox(inception=_features))["fid"] is None
    assert score_run(PLAN, entries[:2], out, "ip", 1.0, Toolbox(inception=_features))["fid"] is not None


def test_the_toolbox_loads_what_is_asked_and_says_why_a_network_is_missing(monkeypatch) -> None:
    """Each metric's network lands in its slot, loaded with the named source and device; one that cannot load
    (a missing optional package or file) becomes a `skipped` reason instead of failing the run."""
    calls = []

    def loader(name, fail=False):
        def load(*args):
            calls.append((name, args))
            if fail:
                raise extractors.MetricUnavailable(f"{name} needs something")
            return name
        return load

    monkeypatch.setattr(extractors, "dino_embedder", loader("dino"))
    monkeypatch.setattr(extractors, "inception_features", loader("inception"))
    monkeypatch.setattr(extractors, "lpips_distance", loader("lpips", fail=True))
    monkeypatch.setattr(extractors, "arcface_embedder", loader("face"))
    box = build_toolbox(["clip_t", "dino_i", "fid", "lpips", "face_id", "attributes"], lambda: "judge",
                        inception="pt_inception.pt", device="meta")
    assert (box.judge, box.dino, box.inception, box.lpips, box.face) == ("judge", "dino", "inception", None, "face")
    assert calls == [("dino", (extractors.DINO_DEFAULT, "meta")), ("inception", ("pt_inception.pt", "meta")),
                     ("lpips", ("meta",)), ("face", ())]
    assert box.skipped == {"lpips": "lpips needs something",
                           "attributes": "per-attribute agreement needs an attribute judge and a manifest with attrs"}
    calls.clear()
    box = build_toolbox(["dino_i"], lambda: pytest.fail("no CLIP metric asked"), dino="my/dino")
    assert box.judge is None and calls == [("dino", ("my/dino", "cpu"))] and not box.skipped


def test_metrics_without_a_defined_value_are_none(run_dir) -> None:
    """LPIPS diversity needs two samples of a reference; face similarity needs one face: else None, not 0 or NaN."""
    out, entries = run_dir
    one_sample = Plan(("ip",), (1.0,), samples=1, seed=0, empty_prompt=False, settings={})
    box = Toolbox(lpips=lambda a, b: 1.0, face=lambda images: torch.full((len(images), 4), float("nan")))
    row = score_run(one_sample, entries, out, "ip", 1.0, box)
    assert row["lpips"] is None and row["face_id"] is None and row["face_missing"] == 3
