"""The Gradio page: controls on the left, results, messages and the reproducing command on the right.

The only module of the app that imports gradio. Handlers never raise for a user's mistake: they put the sentence
in the message area and leave the rest of the page as it was, so the app keeps serving.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ipadapter.app.form import MAX_IMAGES, Form
from ipadapter.app.limits import UploadLimits, open_upload
from ipadapter.app.masks import mask_from_editor
from ipadapter.app.service import GenerationService
from ipadapter.conditioning.combine import COMBINE_MODES
from ipadapter.errors import IPAdapterError

MASK_SLOTS = 4
NO_PRESET = "none"
PROGRESS = gr.Progress()  # the marker default by which Gradio finds the parameter; each call gets its own tracker
INTRO = ("Drop one or more reference images, add a prompt if you like, and generate. "
         "The command under the results reproduces them with `ipadapter generate`.")


def _paths(files: Any) -> list[str]:
    """gr.File's value (None, a path, or a list of paths) as a list."""
    if not files:
        return []
    return [str(f) for f in (files if isinstance(files, list) else [files])]


def _error(err: IPAdapterError) -> str:
    return f"**Cannot do that:** {err}"


def check_references(files: Any, limits: UploadLimits) -> tuple[list[Any], str]:
    """Preview the uploads that are images and name each one refused, right when they arrive."""
    previews, problems = [], []
    for i, path in enumerate(_paths(files)):
        try:
            previews.append(open_upload(path, limits, f"reference {i + 1}"))
        except IPAdapterError as err:
            problems.append(_error(err))
    return previews, "\n\n".join(problems)


def build_ui(service: GenerationService) -> gr.Blocks:
    """The whole page, wired to `service`; launch it with `launch`."""
    with gr.Blocks(title="ipadapter", analytics_enabled=False) as page:
        gr.Markdown(f"## ipadapter: image prompts\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                references = gr.File(label="Reference images (drop one or more)", file_count="multiple",
                                     elem_id="references")
                previews = gr.Gallery(label="References", columns=4, height=140, interactive=False,
                                      elem_id="previews")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Image prompt scale", elem_id="scale")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    steps = gr.Slider(1, 100, value=service.default_steps, step=1, label="Steps", elem_id="steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images", elem_id="num-images")
                with gr.Accordion("Control", open=False):
                    preset = gr.Dropdown([NO_PRESET, *service.presets], value=NO_PRESET, label="Layer preset")
                    with gr.Row():
                        start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Start (fraction of the steps)")
                        end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="End")
                    combine = gr.Dropdown(list(COMBINE_MODES), value="concat", label="Combine references")
                    negative = gr.File(label="Negative image (steer away from it)", file_count="single",
                                       elem_id="negative-image")
                    with gr.Row():
                        content = gr.Textbox(label="Take out content: words for what the reference shows "
                                             "(keeps its style; global-embedding adapters)", elem_id="content")
                        content_strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Content strength",
                                                     interactive=False, elem_id="content-strength")
                with gr.Accordion("Masks: paint where each reference acts, or upload a mask (white = acts)",
                                  open=False):
                    editors = []
                    with gr.Tabs():
                        for i in range(MASK_SLOTS):
                            with gr.Tab(f"Reference {i + 1}"):
                                editors.append(gr.ImageEditor(
                                    label=f"Mask for reference {i + 1}", type="pil", sources=["upload"],
                                    canvas_size=(512, 512), height=360, elem_id=f"mask-{i + 1}"))
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(label="Results", format="png", columns=2, buttons=["download", "fullscreen"],
                                     elem_id="gallery")
                command = gr.Code(label="Reproduce with", language="shell", buttons=["copy"], wrap_lines=True,
                                  lines=3, max_lines=12, show_line_numbers=False, elem_id="command")

        def on_generate(values: dict[Any, Any], progress: gr.Progress = PROGRESS) -> tuple[Any, Any, str]:
            chosen = values[preset]
            form = Form(
                references=_paths(values[references]), masks=[mask_from_editor(values[e]) for e in editors],
                prompt=values[prompt] or "", negative_prompt=values[negative_prompt] or "", scale=float(values[scale]),
                preset=None if chosen == NO_PRESET else chosen, start=float(values[start]), end=float(values[end]),
                combine=values[combine], negative_image=(_paths(values[negative]) or [None])[0],
                content_subtract=values[content] or "", content_strength=float(values[content_strength]),
                seed=int(values[seed] or 0), steps=int(values[steps]), num_images=int(values[num_images]),
            )
            progress(0, desc="preparing")
            try:
                result = service.generate(form, lambda done, total: progress((done, total), desc="denoising"))
            except IPAdapterError as err:
                return gr.update(), gr.update(), _error(err)
            return result.images, result.command, "\n\n".join(result.notes)

        references.change(lambda files: check_references(files, service.limits), inputs=references,
                          outputs=[previews, message])
        content.change(strength_for, inputs=content, outputs=content_strength)
        run.click(on_generate, inputs={references, negative, prompt, negative_prompt, scale, preset, start, end,
                                       combine, content, content_strength, seed, steps, num_images, *editors},
                  outputs=[gallery, command, message], concurrency_limit=1)
    return page


def strength_for(words: str | None) -> Any:
    """The content strength slider takes input only while there are content words for it to act on; without them
    it goes back to 1, which the form requires then (a disabled slider left elsewhere could not be moved back)."""
    if (words or "").strip():
        return gr.update(interactive=True)
    return gr.update(interactive=False, value=1.0)


def launch(page: gr.Blocks, *, host: str, port: int, limits: UploadLimits) -> None:
    """Serve until interrupted; users are queued and served one at a time."""
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, max_file_size=limits.max_bytes, ssr_mode=False)
