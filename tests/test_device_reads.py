"""A denoising step never waits for the GPU: nothing of ours reads a value back from the device once per step.

On a GPU every read of a device tensor's value (`float(t)`, `int(t.argmin())`, `bool(mask.all())`, a copy to the CPU)
stops the CPU until the GPU has finished all the work queued before it. Once per step, that removes the overlap of
the CPU queueing the next step's kernels with the GPU running the last ones, and a full SDXL generation at 1024 px on
an H200 took 19-26% longer than the plain pipeline (diffusers' own adapter: within noise of plain). Here meta tensors
play the GPU: they hold no values, so any read of one is caught by a dispatch mode and counted, and the one copy the
attachment is allowed per generation (the scheduler's timesteps, to the CPU) is served the real values.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from ipadapter import AdapterPrompt, Reference, attach
from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.projection import ProjectionConfig
from tests import factories

META = torch.device("meta")


class DeviceReads(TorchDispatchMode):
    """Records every value read from, and copy to the CPU of, a tensor off the CPU; a copy of `host`'s shape is
    answered with `host` (the values the meta tensor stands for), any other with an error."""

    def __init__(self, host: torch.Tensor) -> None:
        super().__init__()
        self.host = host
        self.reads: list[str] = []
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.reads.append(f"value read of a {tuple(args[0].shape)} tensor")
            raise RuntimeError("a device value was read")
        to_cpu = func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "cpu"
        if to_cpu and args[0].device.type != "cpu":
            self.copies += 1
            if args[0].shape != self.host.shape:
                self.reads.append(f"copy to the CPU of a {tuple(args[0].shape)} tensor")
                raise RuntimeError("a device tensor was copied to the CPU")
            return self.host.to(kwargs.get("dtype") or self.host.dtype)
        return func(*args, **kwargs)


def _timesteps_on_meta(scheduler, steps: int) -> torch.Tensor:  # noqa: ANN001
    """Set the scheduler's timesteps and move them to the meta device, as a pipeline puts them on its device; returns
    their values (what the attachment's one copy per generation is served)."""
    scheduler.set_timesteps(steps)
    host = scheduler.timesteps.clone()
    scheduler.timesteps = scheduler.timesteps.to(META)
    return host


def _meta_setup(masked: bool):
    unet = factories.sdxl_unet()
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SDXL_CROSS, tokens=4))
    adapter = IPAdapter.for_unet(unet, config).to(META)
    unet.to(META)
    scheduler = EulerDiscreteScheduler()
    host = _timesteps_on_meta(scheduler, 6)
    attachment = attach(unet, adapter, scheduler=scheduler)
    tokens = torch.randn(2, 4, factories.SDXL_CROSS, device=META)
    masks = [torch.zeros(64, 64), torch.zeros(64, 64)]  # on the CPU, as users give them
    masks[0][:, :32] = 1
    masks[1][:, 32:] = 1
    refs = [Reference(cond=tokens[i : i + 1], uncond=torch.zeros_like(tokens[:1]), mask=masks[i] if masked else None)
            for i in range(2 if masked else 1)]
    # Half the steps outside the window: a step where the adapter is off reads no more than one where it is on.
    attachment.set_prompts({"0": AdapterPrompt(refs, start=0.0, end=0.5)}, rows=1)
    return unet, attachment, scheduler, host


def _steps(masked: bool) -> tuple[DeviceReads, list[float | None]]:
    unet, attachment, scheduler, host = _meta_setup(masked)
    sample = torch.randn(2, 4, 16, 16, device=META)
    text = torch.randn(2, 8, factories.SDXL_CROSS, device=META)
    added = {k: v.to(META) for k, v in factories.sdxl_added_cond(2).items()}
    progress = []
    mode = DeviceReads(host.float())
    with torch.no_grad(), mode:
        for t in scheduler.timesteps:  # as the SD and SDXL pipelines call their UNet: t is a view of the timesteps
            unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added)
            progress.append(attachment.runtime.progress)
    attachment.detach()
    return mode, progress


def test_no_step_reads_a_device_value_and_the_progress_is_the_step_position() -> None:
    mode, progress = _steps(masked=False)
    assert mode.reads == []
    assert mode.copies == 1, "the timesteps, copied once for the whole generation"
    assert progress == [i / 6 for i in range(6)], "the progress is the call's position in the loop"


def test_masked_references_read_no_device_value_either() -> None:
    """Masks are given on the CPU: they are resized there, once per generation and token grid, and then moved."""
    mode, progress = _steps(masked=True)
    assert mode.reads == [] and mode.copies == 1
    assert progress == [i / 6 for i in range(6)]


def test_a_timestep_that_is_not_the_schedulers_own_is_still_placed_by_its_value() -> None:
    """A caller's own timestep tensor (not a view of the scheduler's) on the CPU: placed by value, as before."""
    unet = factories.sdxl_unet()
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SDXL_CROSS, tokens=4))
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    attachment = attach(unet, IPAdapter.for_unet(unet, config), scheduler=scheduler)
    try:
        values = scheduler.timesteps.tolist()
        for i, value in enumerate(values):
            for given in (value, torch.tensor(value + 0.3), torch.tensor([value - 0.3, 7.0])):
                assert attachment._progress(given) == i / 4
    finally:
        attachment.detach()


def test_the_sd_and_sdxl_pipelines_pass_views_of_their_schedulers_timesteps(tmp_path) -> None:
    """What the GPU path relies on, checked against diffusers' own pipelines: at every UNet call `t` is a view into
    `scheduler.timesteps` at the position of its value (text-to-image from the first step, img2img from the step its
    strength starts at). Where a pipeline passes a copy instead, the value is read (one wait per step), still right."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from ipadapter.attach import view_index

    sd15 = factories.tiny_sd15_pipeline(tmp_path)
    runs = {
        "sd15": (sd15, {}),
        "sd15 img2img": (StableDiffusionImg2ImgPipeline(**sd15.components),
                         {"image": factories.reference_image(0, 32), "strength": 0.5}),
        "sdxl": (factories.tiny_sdxl_pipeline(tmp_path), {"height": 32, "width": 32}),
    }
    for name, (pipe, extra) in runs.items():
        found: list[tuple[int | None, int]] = []

        def record(module, args, kwargs) -> None:  # noqa: ANN001
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            timesteps = pipe.scheduler.timesteps
            found.append((view_index(t, timesteps), int((timesteps == t).nonzero()[0, 0])))

        hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
        pipe(prompt="a", num_inference_steps=4, output_type="latent", **extra)
        hook.remove()
        assert found and all(view == position for view, position in found), (name, found)
        assert [p for _, p in found] == list(range(found[0][1], found[0][1] + len(found))), (name, found)
        assert (found[0][1] > 0) == ("img2img" in name), "img2img starts later in the timesteps"


# ---- FLUX: the pipeline passes its own tensor (t / 1000), so the step comes from the pipeline's loop -------------


def _flux_on_meta():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ipadapter.dit.attach import attach_dit
    from ipadapter.dit.checkpoint import dit_adapter_from_state_dict
    from tests import dit_factories as df

    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model).to(META)
    model.to(META)
    scheduler = FlowMatchEulerDiscreteScheduler()
    host = _timesteps_on_meta(scheduler, 4)
    attachment = attach_dit(model, adapter, scheduler=scheduler)
    tokens = torch.randn(1, 4, df.FLUX_JOINT, device=META)
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=tokens, uncond=torch.zeros_like(tokens))])}, rows=1)
    ids = torch.zeros(4 * 6, 3, device=META)
    attachment._ids = (ids, (4, 6))  # the grid is read once per ids tensor, i.e. once per generation
    inputs = dict(hidden_states=torch.randn(1, 24, 4, device=META),
                  encoder_hidden_states=torch.randn(1, 5, df.FLUX_JOINT, device=META),
                  pooled_projections=torch.randn(1, 32, device=META), img_ids=ids,
                  txt_ids=torch.zeros(5, 3, device=META))
    return model, attachment, scheduler, host, inputs


class _Loop:
    """What the attachment reads of a FLUX pipeline: `current_timestep`, set by its loop before each step."""

    current_timestep: torch.Tensor | None = None


def test_flux_steps_read_no_device_value_when_the_pipeline_says_which_step_it_is() -> None:
    """As FluxPipeline calls its transformer with true CFG: `t / 1000`, a new tensor, twice per step (prompt, then
    negative prompt). Reading it would wait for the GPU at every call; the pipeline's `current_timestep` (a view of
    the scheduler's timesteps) places the call instead, and the second call of a step is still the negative one."""
    model, attachment, scheduler, host, inputs = _flux_on_meta()
    loop = _Loop()
    attachment.pipeline = loop
    seen = []
    mode = DeviceReads(host.float())
    with torch.no_grad(), mode:
        for t in scheduler.timesteps:
            loop.current_timestep = t
            timestep = t.expand(1).to(torch.float16) / 1000
            for _ in range(2):
                model(**inputs, timestep=timestep)
                seen.append((attachment.runtime.progress, attachment.step.negative))
    attachment.detach()
    assert mode.reads == []
    assert mode.copies == 1, "the timesteps, copied once for the whole generation"
    assert seen == [(i / 4, negative) for i in range(4) for negative in (False, True)]



def test_a_view_of_the_schedulers_timesteps_is_placed_without_a_tensor_operation() -> None:
    """The SD and SDXL pipelines pass views of their scheduler's timesteps: the attachment looks the place up (no
    subtraction, no argmin at every UNet call), and it is the place the nearest-value search gives: for a value the
    schedule repeats (Heun's and DPM2's second-order steps) its first position."""
    from diffusers import HeunDiscreteScheduler

    unet = factories.sdxl_unet()
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SDXL_CROSS, tokens=4))
    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(4)
    values = scheduler.timesteps.tolist()
    assert len(set(values)) < len(values), "the schedule repeats values (else this test shows nothing)"
    attachment = attach(unet, IPAdapter.for_unet(unet, config), scheduler=scheduler)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    try:
        attachment._progress(scheduler.timesteps[0])  # the one copy of the timesteps, made once per schedule
        for i, t in enumerate(scheduler.timesteps):
            with Ops() as mode:
                found = attachment._progress(t)
            assert mode.ops == [], mode.ops
            assert found == values.index(values[i]) / len(values)
            assert found == attachment._progress(torch.tensor(values[i]))  # by value: the search
    finally:
        attachment.detach()


def _sd15_attached(scheduler):  # noqa: ANN001, ANN202
    """A new base adapter attached to the SD 1.5-shaped test UNet, reading `scheduler`'s position."""
    unet = factories.sd15_unet()
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    return attach(unet, IPAdapter.for_unet(unet, config), scheduler=scheduler)


def test_a_calls_timestep_is_read_as_a_number_from_the_host_copy_where_it_is_a_view() -> None:
    """`_timestep_value`: a number, a numpy integer (older schedulers' timesteps) and a CPU tensor are read as they
    are; a device tensor that is a view into the scheduler's timesteps (one of them, or one expanded over the batch)
    is looked up in the host copy, with no value read from the device; one of its own is read."""
    import numpy as np

    scheduler = EulerDiscreteScheduler()
    host = _timesteps_on_meta(scheduler, 6)
    attachment = _sd15_attached(scheduler)
    try:
        read = attachment._timestep_value
        assert read(None) is None
        assert [read(500), read(np.int64(500)), read(torch.tensor([500.0, 500.0]))] == [500.0] * 3
        mode = DeviceReads(host.float())
        with mode:
            found = [read(scheduler.timesteps[2]), read(scheduler.timesteps[4].expand(2))]
        assert mode.reads == []
        assert found == [float(host[2]), float(host[4])]

        class Serve(TorchDispatchMode):
            """Answers a value read of a meta tensor with 0.25: a device tensor of its own must be read."""

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                if func is torch.ops.aten._local_scalar_dense.default and args[0].device == META:
                    return 0.25
                return func(*args, **(kwargs or {}))

        with Serve():
            assert read(torch.empty(1, device=META)) == 0.25  # FLUX's t / 1000, a new tensor: read
    finally:
        attachment.detach()


def test_outside_the_loop_or_without_a_position_no_step_is_read_from_the_scheduler() -> None:
    """`_loop_timestep`: a scheduler that has stepped past its last timestep (the UNet called after the loop), or one
    with neither `step_index` nor `begin_index` (a scheduler of the user's own), places no step: None, not an error."""
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    attachment = _sd15_attached(scheduler)
    try:
        scheduler._step_index = 3
        assert attachment._loop_timestep() == float(scheduler.timesteps[3])  # the last step is still placed
        scheduler._step_index = 4
        assert attachment._loop_timestep() is None

        class OwnScheduler:
            timesteps = torch.tensor([999.0, 500.0, 1.0])

        attachment.scheduler = OwnScheduler()
        assert attachment._loop_timestep() is None
    finally:
        attachment.detach()


def test_a_view_is_placed_only_inside_the_timesteps_it_is_a_view_of() -> None:
    """`view_index` on the layouts pipelines make: the img2img pipelines slice their timesteps from a longer schedule
    (`timesteps[t_start:]`), whose elements are placed from the slice's start; an element of the schedule outside
    the slice, of another tensor, of another dtype's view of the same memory, of a 2-D or a broadcast (stride 0)
    tensor is no position. The truth is the slicing itself."""
    from ipadapter.attach import view_index

    schedule = torch.arange(10.0)
    timesteps = schedule[2:5]
    assert [view_index(timesteps[i], timesteps) for i in range(3)] == [0, 1, 2]
    assert view_index(schedule[3].expand(2), timesteps) == 1  # one expanded over the batch
    assert [view_index(schedule[i], timesteps) for i in (0, 1, 5, 7)] == [None] * 4
    assert view_index(torch.arange(10.0)[3], timesteps) is None
    assert view_index(timesteps.view(torch.int32)[1], timesteps) is None
    grid = torch.arange(6.0).view(2, 3)
    assert view_index(grid[1, 0], grid) is None
    broadcast = torch.tensor([5.0]).expand(4)
    assert view_index(broadcast[2], broadcast) is None


def test_a_scheduler_without_timesteps_places_no_timestep() -> None:
    """Before `set_timesteps` (or for a scheduler of the user's own without any), no call is placed: None."""
    attachment = _sd15_attached(EulerDiscreteScheduler())
    try:
        view = torch.arange(3.0)[1]
        attachment.scheduler.timesteps = None
        assert attachment._scheduler_index(view) is None
        attachment.scheduler = object()
        assert attachment._scheduler_index(view) is None
    finally:
        attachment.detach()
