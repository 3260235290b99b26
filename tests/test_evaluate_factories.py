"""Tiny measuring models shared by the evaluation tests (a random judge CLIP, DINOv2, miniature assets), and their checks."""

from __future__ import annotations

import torch

from tests import factories


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A `CLIPModel` whose text tower reads `factories.tiny_tokenizer` ids (vocab 80, 16 positions), 8 px patches."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=80, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(common, image_size=image_size, patch_size=8), projection_dim=24,
    )
    return CLIPModel(config).eval()


def save_judge(folder, image_size: int = 32) -> str:
    """A judge CLIP folder as `ClipJudge.load` reads it (model, tokenizer, image processor)."""
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tiny_clip(image_size=image_size).save_pretrained(folder)
    factories.tiny_tokenizer(folder).save_pretrained(folder)
    size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    CLIPImageProcessor(size=size[0], crop_size=size[1]).save_pretrained(folder)
    return str(folder)


def fake_miniature_assets(root, pipe_dir, adapter_state) -> None:
    """An assets folder laid out as `ipadapter.miniature.assets` expects, with tiny random models (64-px judge)."""
    import json
    import shutil

    from safetensors.torch import save_file

    from ipadapter.miniature.judge import CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, AttributeClassifier
    from ipadapter.miniature.world import ATTRIBUTES

    shutil.copytree(pipe_dir, root / "pipeline")
    (root / "adapters").mkdir(parents=True)
    flat = {f"{part}.{k}": v.contiguous() for part, sd in adapter_state.items() for k, v in sd.items()}
    save_file(flat, root / "adapters" / "base.safetensors")
    judge = root / "judge"
    save_judge(judge / "clip", image_size=64)
    torch.manual_seed(0)
    save_file(AttributeClassifier(width=8).state_dict(), judge / CLASSIFIER_WEIGHTS)
    (judge / CLASSIFIER_CONFIG).write_text(json.dumps({"width": 8, "attributes": ATTRIBUTES}))


def save_dino(folder) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(folder)
    return str(folder)


def test_tiny_judge_folder_loads_as_a_full_clip(tmp_path) -> None:
    from ipadapter.evaluate.judges import ClipJudge

    judge = ClipJudge.load(save_judge(tmp_path / "judge"))
    assert judge.text_embeds(["a cat"]).shape == judge.image_embeds([factories.reference_image(0)]).shape == (1, 24)
