"""Published numbers (docs/checkpoints.md §7) as data, each with its source and the protocol it was measured under."""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "Ye et al. 2023, IP-Adapter (arXiv 2308.06721), Table 1"
DREAMBENCH_PP = "Peng et al. 2024, DreamBench++ (GPT-4o judge), leaderboard"
ARC2FACE = "Papantoniou et al. 2024, Arc2Face, AgeDB benchmark table"


@dataclass(frozen=True)
class Published:
    benchmark: str
    method: str
    values: dict[str, float]
    source: str


def _rows(benchmark: str, source: str, keys: tuple[str, ...], table: dict[str, tuple[float, ...]]) -> list[Published]:
    return [Published(benchmark, method, dict(zip(keys, values)), source) for method, values in table.items()]


# benchmark -> what it measured, in words (printed above the table in the report)
PROTOCOLS = {
    "paper-table1": "COCO-2017 val, 5,000 images, 4 samples per image prompt, DDIM 50, guidance 7.5, empty text, "
                    "judge CLIP ViT-L/14; CLIP-T = CLIPScore 2.5·max(cos, 0) against the image's caption",
    "dreambench++": "150 subjects × 9 prompts, GPT-4o judge: CP concept preservation, PF prompt following (0–1)",
    "agedb": "AgeDB faces (Arc2Face benchmark): ArcFace ID cosine ↑, FID ↓, LPIPS diversity ↑",
}

PUBLISHED: list[Published] = [
    *_rows("paper-table1", PAPER, ("params_m", "clip_t", "clip_i"), {
        "Open unCLIP": (893, 0.608, 0.858),
        "Kandinsky-2-1": (1229, 0.599, 0.855),
        "Versatile Diffusion": (860, 0.587, 0.830),
        "SD Image Variations": (860, 0.548, 0.760),
        "SD unCLIP": (870, 0.584, 0.810),
        "Uni-ControlNet (global)": (47, 0.506, 0.736),
        "T2I-Adapter (style)": (39, 0.485, 0.648),
        "ControlNet Shuffle": (361, 0.421, 0.616),
        "IP-Adapter": (22, 0.588, 0.828),
    }),
    *_rows("dreambench++", DREAMBENCH_PP, ("cp", "pf"), {
        "IP-Adapter ViT-G SDXL": (0.593, 0.640),
        "IP-Adapter-Plus ViT-H SDXL": (0.833, 0.413),
        "DreamBooth-LoRA SDXL": (0.597, 0.865),
        "BLIP-Diffusion": (0.547, 0.495),
        "Emu2": (0.528, 0.689),
    }),
    *_rows("agedb", ARC2FACE, ("face_id", "fid", "lpips"), {
        "FaceID-Plus": (0.600, 11.817, 0.384),
        "FaceID-PlusV2": (0.572, 10.798, 0.429),
        "FaceID SDXL": (0.535, 24.105, 0.462),
        "PhotoMaker": (0.287, 8.410, 0.424),
        "Arc2Face": (0.796, 6.628, 0.508),
    }),
]


def published(benchmark: str) -> list[Published]:
    return [p for p in PUBLISHED if p.benchmark == benchmark]
