"""Evaluation protocols as data: which references, prompts, sampler settings, judge and metrics a run uses.

Flags override any field; the report lists every deviation from the named protocol, and puts published numbers
beside ours only when there is none (`comparable`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate.judges import PAPER_JUDGE
from ipadapter.loading import MINIATURE_GUIDANCE, MINIATURE_STEPS

MINIATURE_JUDGE = "miniature"
MINIATURE_REFERENCES = 12  # held-out scenes the miniature protocol draws (`ipadapter.miniature.protocol`)


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    references: str  # what the manifest should hold
    metrics: tuple[str, ...]
    samples: int
    scales: tuple[float, ...]
    steps: int
    guidance: float
    scheduler: str | None
    empty_prompt: bool  # generate from the image alone; the manifest text is then only the CLIP-T target
    judge: str
    published: str | None = None  # benchmark key in `published.PUBLISHED`
    comparable: bool = False  # True: our numbers are measured as the published ones were
    reference_count: int | None = None  # the benchmark's size, when it has a fixed one

    def settings(self) -> dict:
        return {"samples": self.samples, "scales": list(self.scales), "steps": self.steps, "guidance": self.guidance,
                "scheduler": self.scheduler, "empty_prompt": self.empty_prompt, "judge": self.judge,
                "references": self.reference_count}


PROTOCOLS: dict[str, Protocol] = {
    "paper-table1": Protocol(
        "paper-table1", "the IP-Adapter paper's Table 1: image-only prompting on COCO-2017 val",
        "COCO-2017 val images with one caption each (5,000 in the paper; see `from_coco_captions`)",
        ("clip_i", "clip_t"), samples=4, scales=(1.0,), steps=50, guidance=7.5, scheduler="DDIMScheduler",
        empty_prompt=True, judge=PAPER_JUDGE, published="paper-table1", comparable=True, reference_count=5000,
    ),
    "dreambench": Protocol(
        "dreambench", "subject-driven generation: a subject image plus an edit prompt (DreamBench subjects × prompts)",
        "DreamBench subjects × prompts (see `from_dreambench`)",
        ("clip_i", "dino_i", "clip_t"), samples=4, scales=(0.5, 0.7, 1.0), steps=50, guidance=7.5,
        scheduler="DDIMScheduler", empty_prompt=False, judge=PAPER_JUDGE, published="dreambench++",
    ),
    "face": Protocol(
        "face", "face identity for FaceID adapters: a face image plus a prompt",
        "face photos with prompts (the Arc2Face benchmark uses AgeDB)",
        ("face_id", "fid", "lpips"), samples=4, scales=(1.0,), steps=50, guidance=7.5, scheduler="DDIMScheduler",
        empty_prompt=False, judge=PAPER_JUDGE, published="agedb",
    ),
    "miniature": Protocol(
        "miniature", "the bundled shapes world: held-out scenes, the reference's object asked on another background",
        "held-out shapes-world scenes (built automatically; see `ipadapter.miniature.protocol`)",
        ("clip_i", "clip_t", "attributes"), samples=2, scales=(0.0, 0.25, 0.5, 0.75, 1.0), steps=MINIATURE_STEPS,
        guidance=MINIATURE_GUIDANCE, scheduler=None, empty_prompt=False, judge=MINIATURE_JUDGE,
        reference_count=MINIATURE_REFERENCES,
    ),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise IPAdapterError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def deviations(chosen: Protocol, used: dict) -> list[str]:
    """Settings in `used` that differ from the protocol's, as 'name: used (protocol: x)'; None = the model's own
    (the scheduler) or no fixed size (a benchmark's reference count)."""
    expected = chosen.settings()
    return [f"{k}: {used[k]} (protocol: {v})" for k, v in expected.items()
            if k in used and v is not None and used[k] != v]
