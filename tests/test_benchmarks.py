"""The inference benchmark's smoke run on tiny models: every row is there and ipadapter computes what diffusers does.

No timing assertions: the numbers of a smoke run on toy models mean nothing.
"""

from __future__ import annotations

import gc
import inspect
import math
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import inference
from tests import factories

Memory = dict[str, float]  # `inference.measure_memory`'s result: MiB per row


@pytest.fixture(autouse=True)
def older_objects_frozen() -> Iterator[None]:
    """The benchmarks collect garbage around every run and `held_tensors` walks every object of the process: in a
    test process some 400 000 objects of imports and earlier tests, a fifth of a second each time, half of this file's
    time. Frozen (`gc.freeze`) they are skipped; what the test makes is still collected, counted and measured (the
    held-tensor counts move by the same 208 bytes for every implementation, the peaks not at all)."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def sd15_memory() -> Callable[[str], Memory]:
    """`inference.measure_memory` on SD 1.5's tiny models, run once per implementation for the module: its result
    depends on the setting and implementation alone, and the tests of it and of the rows built from it share it."""
    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", "sd15"]))[0]
    found: dict[str, Memory] = {}
    real = inference.measure_memory  # a test may replace it with this fixture

    def measure(impl: str) -> Memory:
        if impl not in found:
            found[impl] = real(setting, impl)
        return found[impl]

    return measure


def test_quick_run_has_every_row_and_equals_diffusers(tmp_path) -> None:
    args = inference.parse_args(["--quick", "--no-memory", "--repeats", "2", "--out", str(tmp_path / "bench.md")])
    rows, memory, notes = inference.benchmark(args)
    assert memory == []
    for arch in ("SD1.5", "SDXL"):
        for case in ("(a)", "(b)", "(c)", "(d)", "(e)"):
            found = [r for r in rows if r.label.startswith(f"{arch} {case}")]
            assert len(found) == 1, f"{arch} {case}: {[r.label for r in rows]}"
            r = found[0]
            assert min(r.plain + r.ours + r.diffusers) > 0 and len(r.plain) == len(r.ours) == len(r.diffusers) > 1
            # Same seed, same weights: the latents of ipadapter and diffusers agree (as in test_parity_diffusers).
            assert r.diff <= 1e-4 + 1e-4 * r.scale, f"{r.label}: |Δ| {r.diff} at output scale {r.scale}"
    text = inference.render(["# t"], rows, memory, notes)
    assert all(r.label in text for r in rows) and "Rows slower than diffusers" in text


def test_steps_only_times_the_unet_rows_after_a_warm_up_left_out(tmp_path) -> None:
    args = inference.parse_args(["--quick", "--no-memory", "--rows", "d", "--archs", "sd15", "--repeats", "2",
                                 "--out", str(tmp_path / "bench.md")])
    reported = []
    rows, _, notes = inference.benchmark(args, lambda *found: reported.append([list(x) for x in found]))
    assert [r.label.split()[1] for r in rows] == ["(d)", "(e)"]
    # Reported once, when the architecture is done: its rows, the kernels note and the timing note, before the
    # verdicts are added.
    assert len(reported) == 1 and reported[0][:2] == [rows, []]
    assert reported[0][2] == [n for n in notes if n.startswith(("- SD1.5 operators that run a kernel", "- SD1.5 timing:"))]
    assert len(reported[0][2]) == 2
    assert all(len(r.plain) == len(r.ours) == len(r.diffusers) == 2 for r in rows)
    assert any("adapter overhead per denoising step" in line for line in notes)


def test_each_step_loop_starts_after_one_untimed_call_of_a_previous_generation(monkeypatch) -> None:
    """Rows (d) and (e): every implementation's setup ends with one UNet call, so the timed first step is not also
    the first call after switching implementations; ipadapter's was a generation of its own, with another
    reference, so the timed loop's first step still makes the generation's plan."""
    import importlib

    attach = importlib.import_module("ipadapter.attach")
    prompts: list[dict] = []
    real = attach.Attachment.set_prompts
    monkeypatch.setattr(attach.Attachment, "set_prompts",
                        lambda self, given, **kw: prompts.append(given) or real(self, given, **kw))
    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", "sd15"]))[0]
    bench = inference.Bench(setting, inference.IMPLS)
    calls: list[int] = []
    bench.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for impl, (setup, _) in bench.step_runs().items():
            calls.clear()
            setup()
            assert len(calls) == 1, impl
            if impl == "ipadapter":
                attachment = bench.prompter.attachment
                assert {p.state.generation for p in attachment._processors} == {attachment.runtime.generation - 1}
    finally:
        bench.close()
    (before,), (timed,) = (list(p.values()) for p in prompts)
    assert not torch.equal(before.references[0].cond, timed.references[0].cond)


def test_rows_a_and_c_encode_everything_again_after_an_untimed_generation_with_other_references() -> None:
    """(a) and (c) follow a generation on the same attachment, as in a session, and still encode each reference
    and the unconditional image (SD 1.5's Plus adapter: CLIP runs on zero pixels for it): nothing is reused."""
    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", "sd15"]))[0]
    bench = inference.Bench(setting, ("ipadapter",))
    inputs: list[torch.Tensor] = []
    bench.encoder_model.register_forward_pre_hook(lambda _, args, kwargs: inputs.append(kwargs["pixel_values"]),
                                                  with_kwargs=True)
    try:
        for case, references in (("full", 1), ("masked", 2)):
            setup, run = bench.generation_run("ipadapter", case)
            inputs.clear()
            setup()
            before = list(inputs)
            inputs.clear()
            hits = bench.prompter.cache.hits
            run()
            assert len(inputs) == references + 1 and bench.prompter.cache.hits == hits, case
            timed = inputs[:references]  # the references, then the unconditional image
            assert len(before) >= references and not any(torch.equal(b, a) for b in before for a in timed), case
    finally:
        bench.close()


def test_launches_counts_the_operators_that_run_a_kernel() -> None:
    with inference.Launches() as mode:
        x = torch.ones(2, 3)  # a fill
        x.view(6), x.t(), x.reshape(3, 2), torch.empty(4)  # relabelled or only allocated memory
        (x @ x.t()).add_(1)  # a matmul and an add
    assert mode.count == 3


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a_unet_step_runs_fewer_kernels_than_diffusers(arch: str) -> None:
    """Where kernels are fast (a GPU, small latents) each launch costs the CPU's time: with one reference the adapter
    adds fewer to a UNet step than diffusers' own IP-Adapter on the same weights, first step (the generation's plan)
    and later ones."""
    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", arch]))[0]
    bench = inference.Bench(setting, inference.IMPLS)
    try:
        found = bench.launches()
    finally:
        bench.close()
    plain, ours, theirs = (found[impl] for impl in inference.IMPLS)
    assert plain[0] == plain[1] and all(p < o < t for p, o, t in zip(plain, ours, theirs)), found


def test_rows_b_times_only_the_generations_row_b_compares(tmp_path, monkeypatch) -> None:
    """`--rows b`: plain's generation, ipadapter's second one and diffusers' (its (b) is its (a)), nothing else."""
    args = inference.parse_args(["--quick", "--no-memory", "--rows", "b", "--archs", "sd15", "--repeats", "2",
                                 "--out", str(tmp_path / "bench.md")])
    timed = []
    interleave = inference.interleave
    monkeypatch.setattr(inference, "interleave",
                        lambda runs, *a, **k: timed.append(list(runs)) or interleave(runs, *a, **k))
    rows, _, notes = inference.benchmark(args)
    assert timed == [[("plain", "full"), ("ipadapter", "second"), ("diffusers", "full"), inference.PROJECTIONS]]
    assert [r.label.split()[1] for r in rows] == ["(b)"]
    assert any("second generation, same reference, over plain" in line for line in notes)
    assert any(line.startswith("- SD1.5 (b), pass by pass: every layer's K'/V' projections alone, 2 steps: +")
               for line in notes), notes


@pytest.mark.parametrize("cache_kv", [False, True])
def test_cache_kv_times_a_second_generation_that_projects_no_k_or_v(tmp_path, monkeypatch, cache_kv: bool) -> None:
    """`--cache-kv`: the timed ipadapter keeps K'/V' for the generation, so row (b), after a generation with the same
    reference, calls no to_k_ip / to_v_ip (without it, each of them once a step), the projections are not timed
    apart, and the table says which ipadapter it timed."""
    flags = ["--quick", "--no-memory", "--rows", "b", "--archs", "sd15", "--repeats", "1"] + ["--cache-kv"] * cache_kv
    setting = inference.settings_of(inference.parse_args(flags))[0]
    assert setting.cache_kv == cache_kv and ("cache_kv=True" in setting.describe()) == cache_kv
    bench = inference.Bench(setting, ("ipadapter",), cache_kv=setting.cache_kv)
    setup, run = bench.generation_run("ipadapter", "second")
    setup()
    projections = [m for _, layer in bench.adapter.named_layers() for m in (layer.to_k_ip, layer.to_v_ip)]
    with factories.calls_of(projections) as calls:
        run()
    bench.close()
    assert len(calls) == (0 if cache_kv else len(projections) * setting.steps)
    timed = []
    interleave = inference.interleave
    monkeypatch.setattr(inference, "interleave",
                        lambda runs, *a, **k: timed.append(list(runs)) or interleave(runs, *a, **k))
    inference.benchmark(inference.parse_args([*flags, "--out", str(tmp_path / "bench.md")]))
    assert (inference.PROJECTIONS in timed[0]) != cache_kv


@pytest.mark.parametrize("case", ["full", "masked"])
def test_a_cold_generation_starts_without_the_k_and_v_the_last_one_kept(case: str) -> None:
    """Rows (a) and (c) with `cache_kv`: the previous generation's K'/V' are emptied with the other caches, so the
    memory baseline does not hold them and the generation pays for its own: run again with the previous generation's
    references, it projects them anew, once a layer (kept, it would reuse them and call no to_k_ip; the embedding
    cache's emptying alone leaves them reusable: re-encoding gives the same tokens)."""
    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", "sd15"]))[0]
    bench = inference.Bench(setting, ("ipadapter",), cache_kv=True)
    setup, _ = bench.generation_run("ipadapter", case)
    setup()
    keys = [layer.to_k_ip for _, layer in bench.adapter.named_layers()]
    with factories.calls_of(keys) as calls:
        bench.generate("ipadapter", case, other=True)
    bench.close()
    assert len(calls) == len(keys) > 0  # once a layer: two masked references are projected together


def test_the_projection_run_projects_every_layers_k_and_v_once_a_step() -> None:
    """What row (b) pays while K'/V' are projected at every step: each of the adapter's to_k_ip and to_v_ip once per
    step, on a CFG pair of the adapter's token rows."""
    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", "sd15"]))[0]
    bench = inference.Bench(setting, ("ipadapter",))
    calls: dict[str, list[tuple[int, ...]]] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, key=f"{name}.{kind}": calls.setdefault(key, []).append(
                 tuple(args[0].shape)))
             for name, layer in bench.adapter.named_layers() for kind, module in
             (("k", layer.to_k_ip), ("v", layer.to_v_ip))]
    setup, run = bench.projection_run()
    setup()
    run()
    for hook in hooks:
        hook.remove()
    bench.close()
    config = bench.adapter.config
    assert len(calls) == 2 * len(bench.adapter.named_layers()) > 0
    assert all(shapes == [(2, config.projection.tokens, config.cross_dim)] * setting.steps for shapes in calls.values())
    with pytest.raises(SystemExit):
        inference.parse_args(["--rows", "bx"])


def test_a_target_is_decided_on_the_interval_of_the_median_with_enough_passes() -> None:
    """With 10 passes the 95% interval of the median runs from the 2nd to the 9th smallest ratio (binomial tables):
    met when the 9th is within the target, not met when the 2nd is above it, undecided between; with 5 passes
    (no interval) the passes' range decides, as before."""
    ten = [1.0 + i / 100 for i in range(10)]  # overheads 0% .. +9%
    assert inference.decide(ten, 1.08).startswith("met (")  # 9th smallest: +8%
    assert inference.decide(ten, 1.079).startswith("undecided")
    assert inference.decide(ten, 1.01).startswith("undecided")  # 2nd smallest: +1%
    assert inference.decide(ten, 1.009).startswith("NOT met")
    assert inference.decide(ten[:5], 1.05) == "met in every pass"
    assert inference.decide(ten[:5], 1.02).startswith("met in the median")


@pytest.mark.parametrize("impl", ["ipadapter", inference.CACHED])
def test_memory_of_one_configuration(impl: str, sd15_memory: Callable[[str], Memory]) -> None:
    """The child's measurement, run in this process: models loaded and each case's peak, in MiB, and the K'/V' the
    cache holds (the Plus adapter's 16 tokens, two CFG rows, K' and V' as wide as each layer, float32)."""
    found = sd15_memory(impl)
    assert set(found) == {"loaded", "full", "second", "masked", "kv1", "kv2"}
    assert found["loaded"] > 0 and all(v >= 0 for v in found.values())
    widths = 2 * sum(m.to_k.out_features for n, m in factories.sd15_unet().named_modules() if n.endswith("attn2"))
    assert found["kv1"] * 2**20 == pytest.approx(2 * 16 * widths * 4) and found["kv2"] == 2 * found["kv1"]


def test_memory_rows_measured_in_one_process_as_on_cuda(monkeypatch, capsys,
                                                        sd15_memory: Callable[[str], Memory]) -> None:
    """CUDA's path (no child processes): every implementation built, measured and freed in turn, one row per case with
    one value per implementation and repeat, and the K'/V' column from ipadapter's adapter (twice as much for two
    references); a progress bar counts the 4 implementations times 2 repeats. Each implementation's measurement is
    run once (`sd15_memory`), and its second repeat given the same: the rows' layout is what is checked here."""

    def no_children(*args, **kwargs):
        raise AssertionError("a child process was started")

    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", "sd15"]))[0]

    def measured(s: inference.Setting, impl: str, *args: object, **kwargs: object) -> Memory:
        assert s == setting and not args and not kwargs, (s, args, kwargs)  # in this process: not as a child
        return sd15_memory(impl)

    monkeypatch.setattr(inference, "ProcessPoolExecutor", no_children)
    monkeypatch.setattr(inference, "measure_memory", measured)
    rows = inference.memory_arch(setting, None, repeats=2)
    assert [r.label.split(" ", 1)[1] for r in rows] == [
        "models loaded (MiB)", *(f"{label}: peak above the models (MiB)" for label in inference.CASES.values())]
    assert all(len(r.plain) == len(r.ours) == len(r.diffusers) == len(r.cached) == 2 for r in rows), "one per repeat"
    kv = {r.label.split()[1]: r.kv for r in rows}
    assert kv["(a)"] > 0 and kv["(c)"] == 2 * kv["(a)"] and kv["models"] is None and kv["(b)"] is None
    err = capsys.readouterr().err
    assert "SD1.5 memory:   0%" in err and "0/8 [" in err


def test_memory_verdicts_with_few_repeats_tell_every_repeat_from_the_median_alone() -> None:
    """Three repeats decide nothing: a row above diffusers in each is reported as such, with the odds of that where
    nothing differs (½³); one above in the median but not in every repeat as within the noise, with its count; one at
    or below in the median, not at all."""
    rows = [inference.Row("A always above", [1, 1, 1], [3, 3, 3], [2, 2, 2], cached=[1, 1, 1]),
            inference.Row("B above in the median", [1, 1, 1], [2.2, 2.1, 1.9], [2, 2, 2], cached=[1, 1, 1]),
            inference.Row("C below in the median", [1, 1, 1], [2.1, 1.9, 1.8], [2, 2, 2], cached=[1, 1, 1])]
    lines = inference.verdicts([], [], rows)
    assert ("- Memory rows where ipadapter is above diffusers in every repeat (with no difference, 1 run in 8 for "
            "each row): A always above") in lines
    assert ("- Memory rows where ipadapter is above diffusers in the median, within the noise: B above in the median "
            "(2 of 3)") in lines


def test_memory_rows_are_heavier_beyond_the_noise_when_the_interval_for_all_rows_lies_above_zero() -> None:
    """Two rows, 9 repeats: the median difference's interval for both together (97.5% each) runs from the smallest to
    the largest difference (binomial(9, ½): P(none below) = 1/512 ≤ 1.25% < P(at most 1 below) = 10/512). A row above
    in all 9 is heavier beyond the noise, with that interval; one above in 8 of 9 is within the noise."""
    diffusers = [2.0] * 9
    always = inference.Row("A", [1.0] * 9, [2.1, 2.2, 2.3, 2.1, 2.1, 2.1, 2.1, 2.1, 2.5], diffusers, cached=diffusers)
    most = inference.Row("B", [1.0] * 9, [1.9] + [2.1] * 8, diffusers, cached=diffusers)
    lines = inference.heavier("ipadapter", {r.label: list(zip(r.ours, r.diffusers)) for r in (always, most)})
    assert lines == [
        "- Memory rows where ipadapter is above diffusers beyond the noise (the 97.5% interval of the median difference "
        "above 0: 95% for the 2 rows together): A (+0.10 to +0.50 MiB)",
        "- Memory rows where ipadapter is above diffusers in the median, within the noise: B (8 of 9)"]


@pytest.mark.parametrize(("n", "ranks"), [(5, None), (6, (1, 6)), (10, (2, 9)), (20, (6, 15)), (100, (40, 61))])
def test_median_interval_is_the_published_order_statistics(n: int, ranks: tuple[int, int] | None) -> None:
    """The distribution-free 95% interval of a median is the pair of order statistics (k, n + 1 − k) of the binomial
    tables (Conover, Practical Nonparametric Statistics: n = 10 → 2nd and 9th, 20 → 6th and 15th, 100 → 40th and
    61st; 5 values allow none, since ½⁵ · 2 > 5%)."""
    values = [float(v) for v in range(n, 0, -1)]  # given unsorted: the helper sorts
    found = inference.median_ci(values)
    assert found == (None if ranks is None else (float(ranks[0]), float(ranks[1])))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_generation_holds_no_more_tensors_than_diffusers(arch: str) -> None:
    """Through the denoising loop, and at the generation's peak, ipadapter's default holds at most what diffusers'
    own IP-Adapter holds, in every case of the inference benchmark (live tensors outside the models, counted
    exactly, tiny models); the K'/V' cache holds more through the loop, by design."""
    from benchmarks import held_tensors

    setting = inference.settings_of(inference.parse_args(["--quick", "--archs", arch]))[0]
    found = held_tensors.measure(setting)
    for case in inference.CASES:
        plain, ours, theirs, cached = (found[impl, cache, case] for impl, cache in (
            ("plain", False), ("ipadapter", False), ("diffusers", False), ("ipadapter", True)))
        assert plain.held < ours.held <= theirs.held, case
        assert cached.held > ours.held, case
        assert plain.peak <= ours.peak <= theirs.peak, case


def test_live_peak_counts_each_storage_once_until_its_last_tensor_is_freed() -> None:
    """`LivePeak` against the bytes worked out by hand: views and in-place results share their storage, storages
    alive before the run are not counted, a storage counts until its last view is gone."""
    import torch

    from benchmarks.held_tensors import LivePeak

    old = torch.ones(1000)
    with LivePeak({old.untyped_storage().data_ptr(): old.untyped_storage()}) as peak:
        a = torch.zeros(1000)  # 4000 B
        view = a[:10].view(2, 5)  # the same storage
        a.add_(1)  # in place: the same storage
        b = old * 2  # 4000 B
        old_view = old[:10]  # a view of a storage from before the run: not counted
        del a
        assert peak.live == 8000, "a's storage lives on through its view"
        del view
        assert peak.live == 4000
        c = torch.empty(3000, dtype=torch.float64)  # 24000 B
        assert peak.live == 28000
        del b, c, old_view
    assert (peak.peak, peak.live) == (28000, 0)


def test_each_pass_starts_one_run_later(capsys) -> None:
    """Every run once per pass, and the first place moves from pass to pass, so no run is always timed first; a
    progress bar on stderr counts the passes, warm-up included."""
    import torch

    order = []
    runs = {k: ((lambda: None), (lambda k=k: order.append(k) or torch.zeros(1))) for k in "abc"}
    times, _ = inference.interleave(runs, repeats=3, device="cpu", label="SDXL steps")
    passes = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert passes == [list("abc"), list("bca"), list("cab"), list("abc")]  # the warm-up pass, then three
    assert all(len(t) == 3 for t in times.values())
    err = capsys.readouterr().err
    assert "SDXL steps:   0%" in err and "0/4 [" in err


def test_load_benchmark_times_both_libraries_on_tiny_models(tmp_path) -> None:
    """benchmarks/load.py on the tiny models: a row per base with both libraries' times and their ratio."""
    import re

    from benchmarks import load

    assert load.main(["--quick", "--archs", "sd15,sdxl", "--repeats", "2", "--out", str(tmp_path / "load.md")]) == 0
    rows = [line for line in (tmp_path / "load.md").read_text().splitlines() if line.startswith("| SD")]
    number = r"\d+\.\d\d"
    assert len(rows) == 2 and all(re.fullmatch(
        rf"\| SD(1\.5|XL): \S+\.bin, \d+ M parameters \| {number} / {number} / {number} \| {number} / {number} / "
        rf"{number} \| {number}x \[{number}–{number}\] \|", row) for row in rows), rows


def test_flux_sync_benchmark_runs_each_generation_with_a_fresh_attachment_where_it_says(tmp_path, monkeypatch) -> None:
    """benchmarks/flux_syncs.py's wiring on the CPU (the counts need CUDA): each row a plain generation and one through
    the prompter, the "first" ones on a new attachment (empty caches), the "next" ones on the same, the img2img row on
    an attachment to FluxImg2ImgPipeline."""
    import ipadapter
    from benchmarks import flux_syncs
    from ipadapter.prompter import ImagePrompter

    loads, generated, pipes = [], [], []
    load, generate = ipadapter.load, ImagePrompter.generate
    monkeypatch.setattr(ipadapter, "load", lambda pipe, *a, **k: loads.append(1) or pipes.append(pipe)
                        or load(pipe, *a, **k))
    monkeypatch.setattr(ImagePrompter, "generate", lambda self, *a, **k: generated.append(len(loads))
                        or generate(self, *a, **k))
    out = tmp_path / "flux.md"
    assert flux_syncs.main(["--device", "cpu", "--dtype", "float32", "--steps", "2", "--out", str(out)]) == 0
    assert generated == [1, 1, 2, 2, 3, 3], ("first and next generation on one attachment, a new one for true CFG, "
                                             "and one on the img2img pipeline: an untimed generation, then the row's")
    assert [type(loaded).__name__ for loaded in pipes] == ["FluxPipeline"] * 2 + ["FluxImg2ImgPipeline"]
    rows = [line.split(",")[0] for line in out.read_text().splitlines()
            if line.startswith(("| first", "| next", "| img2img"))]
    assert rows == ["| first generation (ipadapter encodes the reference)", "| next generation"] * 2 + [
        "| img2img (strength 0.6)"]
    assert "not counted: the sync debug mode watches CUDA only" in out.read_text()


def test_a_row_is_slower_than_diffusers_beyond_the_noise_when_its_interval_for_all_rows_lies_above_one() -> None:
    """Three rows, 9 passes: the interval that holds 95% for the three together (98.33% each, Bonferroni) runs from
    the smallest to the largest ratio (binomial(9, ½): P(none below) = 1/512 ≤ 0.83% < P(at most 1 below) = 10/512);
    each row's own 95% interval from the 2nd to the 8th smallest (10/512 ≤ 2.5% < 46/512)."""
    plain = [1.0] * 9
    every = inference.Row("X (a) every pass", plain, [1.01, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.3], plain)
    alone = inference.Row("X (d) alone", plain, [0.9, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.3], plain)
    noisy = inference.Row("X (e) noisy", plain, [0.8, 0.99, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.3], plain)
    slower, apart, unsure = inference.against_diffusers([every, alone, noisy])
    assert slower.startswith("- Rows slower than diffusers beyond the noise (the 98.33% interval of the median ratio "
                             "above 1: 95% for the 3 rows together): X (a) every pass")
    assert "98.33% interval of the median [1.010, 1.300]" in slower and "alone" not in slower
    assert apart.endswith("within the noise of 3 rows: X (d) alone (1.04x [0.90–1.30], 95% interval of the median "
                          "[1.010, 1.070])")
    assert "X (e) noisy" in unsure and "[0.990, 1.070]" in unsure and "alone" not in unsure
    # Too few passes for the rows' joint interval (9 for 10 rows): slower in every pass or not.
    few = [inference.Row(f"Y ({i})", [1.0] * 8, [1.1] * 8 if i else [0.9] + [1.2] * 7, [1.0] * 8) for i in range(10)]
    slower, unsure = inference.against_diffusers(few)
    assert slower.startswith("- Rows slower than diffusers in every pass (with no difference, 1 run in 256 for each "
                             "row): Y (1)") and "Y (0)" in unsure


def test_a_report_of_equal_rows_names_one_slower_no_more_often_than_its_joint_confidence_allows() -> None:
    """Ten rows, 9 passes, no row differing (each ratio above or below 1 with probability ½): the report names some
    row slower only when one row is slower in all 9 passes, 1 − (511/512)¹⁰ = 1.9% of reports (≤ 2.5%, the one side of
    95%); the rows' own 95% intervals alone would name one in 1 − (502/512)¹⁰ = 17.9%."""
    rng = random.Random(0)
    trials, named, apart = 3000, 0, 0
    plain = [1.0] * 9
    for _ in range(trials):
        rows = [inference.Row(f"Z ({i})", plain, [1 + rng.choice((-1, 1)) * rng.random() / 10 for _ in plain], plain)
                for i in range(10)]
        slower, alone, _ = inference.against_diffusers(rows)
        named += not slower.endswith(": none")
        apart += not (slower.endswith(": none") and alone.endswith(": none"))
    joint, own = 1 - (511 / 512) ** 10, 1 - (502 / 512) ** 10
    for found, expected in ((named, joint), (apart, own)):  # within 4 standard errors of a proportion
        assert abs(found / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)
    assert joint <= 0.025


def test_every_verdict_states_a_median_interval_in_the_same_words() -> None:
    """The verdict on a target, the note's overheads and the rows slower than diffusers all give the 95% interval of
    the median as one phrase: with 9 passes, the 2nd and 8th smallest ratios (as above), as points or as ratios."""
    ratios = [0.9, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.3]
    words = "95% interval of the median"
    assert f"({words} [+1.0, +7.0]%)" in inference.decide(ratios, 1.05)
    assert inference.interval_text(ratios) == f"+4.0% ({words} [+1.0, +7.0]%)"
    plain = [1.0] * 9
    slower, *_ = inference.against_diffusers([inference.Row("X (d)", plain, ratios, plain)])
    assert f"{words} [1.010, 1.070]" in slower


def test_quick_runs_time_on_one_thread_unless_told() -> None:
    assert inference.parse_args(["--quick", "--device", "cpu"]).threads == 1
    assert inference.parse_args(["--quick", "--device", "cpu", "--threads", "2"]).threads == 2
    assert inference.parse_args(["--device", "cpu"]).threads is None


CHILD = """
import ctypes, sys
namespace = {"ctypes": ctypes, "M_MMAP_THRESHOLD": int(sys.argv[3])}
exec(sys.argv[2], namespace)  # benchmarks.inference's fix_mmap_threshold as written, without the module's imports
fix_mmap_threshold = namespace["fix_mmap_threshold"]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(4 << 20))  # a freed mapping of 4 MiB raises glibc's adaptive threshold above 1 MiB
if sys.argv[1] == "fixed":
    fix_mmap_threshold()
address = libc.malloc(1 << 20)
heap = next(line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
start, end = (int(x, 16) for x in heap.split("-"))
print("heap" if start <= address < end else "own mapping")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("mode, where", [("adaptive", "heap"), ("fixed", "own mapping")])
def test_fixed_mmap_threshold_gives_a_large_allocation_its_own_mapping(mode: str, where: str) -> None:
    """glibc's documented behaviour (mallopt(3)): a freed mapping raises the adaptive threshold, so 1 MiB then comes
    from the heap; once the memory children fix it at 64 KiB, 1 MiB is a mapping of its own, returned when freed.
    A new interpreter each: the setting lasts for the process. The child runs the function's own source with the
    module's globals it reads: importing `benchmarks.inference` (torch, diffusers) took 8 s of the 8.5 s."""
    root = Path(__file__).resolve().parents[1]
    source = inspect.getsource(inference.fix_mmap_threshold)
    found = subprocess.run([sys.executable, "-c", CHILD, mode, source, str(inference.M_MMAP_THRESHOLD)], cwd=root,
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == where
