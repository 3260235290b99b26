"""Training a FLUX adapter on the flow-matching loss: the loss on a fixed batch falls, and the result, written in
XLabs' layout, loads in diffusers' FLUX loader and gives diffusers the same transformer output as ours. (The
dropout draw is the UNet trainer's, tested in test_train_data.py.)"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ipadapter.dit.attach import attach_dit
from ipadapter.dit.checkpoint import load_dit_adapter
from ipadapter.dit.flow import flow_matching_loss
from ipadapter.dit.train import encode, train_dit_adapter
from ipadapter.dit.train_flux import save_xlabs
from ipadapter.encoders import ImageEncoder
from ipadapter.train.dropout import Drops
from tests import dit_factories as df
from tests import factories


def test_loss_falls_and_the_file_loads_in_diffusers(tmp_path) -> None:
    from transformers import CLIPImageProcessor

    pipe = df.flux_pipeline(tmp_path)
    encoder = ImageEncoder(factories.tiny_image_encoder()[0], CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), name="tiny-clip")
    colours = [(230, 40, 40), (40, 200, 60), (40, 60, 230), (230, 220, 40)]
    images = [Image.fromarray(np.full((16, 16, 3), c, np.uint8)) for c in colours]
    captions = ["a square"] * 4  # the text says nothing of the colour: only the image prompt can
    data = encode(pipe, encoder, images, captions, 16, max_sequence_length=8)
    g = torch.Generator().manual_seed(5)
    sigma, noise = torch.rand(4, generator=g) * 0.5 + 0.5, torch.randn(data.latents.shape, generator=g)
    keep = Drops(image=torch.zeros(4, dtype=torch.bool), text=torch.zeros(4, dtype=torch.bool))

    def fixed_loss(adapter) -> float:
        attachment = attach_dit(pipe.transformer, adapter)
        with torch.no_grad():
            loss = float(flow_matching_loss(attachment, adapter, data, sigma=sigma, noise=noise, drops=keep))
        attachment.detach()
        return loss

    from ipadapter.dit.train_flux import new_flux_adapter

    torch.manual_seed(0)
    start = new_flux_adapter(pipe.transformer, clip_dim=encoder.global_dim)
    before = fixed_loss(start)
    trained, losses = train_dit_adapter(pipe, encoder, images, captions, steps=60, size=16, adapter=start, lr=3e-3,
                                         max_sequence_length=8)
    after = fixed_loss(trained)
    assert len(losses) == 60 and after < 0.9 * before

    path = save_xlabs(trained, tmp_path / "trained" / "ip_adapter.safetensors")
    ours = load_dit_adapter(path, pipe.transformer)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), trained.state_dict().values()))
    pipe.load_ip_adapter(str(path.parent), weight_name=path.name, image_encoder_pretrained_model_name_or_path=None)
    x = {"hidden_states": data.latents, "encoder_hidden_states": data.text, "pooled_projections": data.pooled,
         "timestep": sigma, "img_ids": data.image_ids, "txt_ids": data.text_ids}
    with torch.no_grad():
        embeds = [data.image[:, None]]
        expected = pipe.transformer(**x, joint_attention_kwargs={"ip_adapter_image_embeds": embeds}).sample
    pipe.unload_ip_adapter()
    from ipadapter.runtime import AdapterPrompt, Reference

    attachment = attach_dit(pipe.transformer, ours)
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=ours.project(data.image))])}, rows=4)
    with torch.no_grad():
        got = pipe.transformer(**x).sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_new_adapter_is_v1_or_v2_by_its_tokens_and_a_guidance_distilled_base_gets_guidance_one() -> None:
    """XLabs' v2 is the 16-token shape; FLUX.1-dev embeds guidance, which training holds at 1 (schnell has none)."""
    from types import SimpleNamespace

    from ipadapter.dit.train_flux import Encoded, new_flux_adapter

    transformer = df.flux_transformer()
    assert [new_flux_adapter(transformer, clip_dim=8, tokens=t).config.variant for t in (4, 16)] == ["flux", "flux-v2"]
    from ipadapter.dit.train_flux import uniform_sigmas

    drawn = uniform_sigmas(None)(3, torch.Generator().manual_seed(4))  # σ ~ U(0, 1) from the step's generator
    assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(4)))
    sigma = torch.tensor([0.2, 0.7])
    batch = Encoded(*([torch.zeros(1)] * 8))
    for embeds, expected in ((True, torch.ones(2)), (False, None)):
        model = SimpleNamespace(config=SimpleNamespace(guidance_embeds=embeds))
        got = batch.call(model, torch.zeros(2), sigma, torch.zeros(1), torch.zeros(1))["guidance"]
        assert (got is None and expected is None) or torch.equal(got, expected)
