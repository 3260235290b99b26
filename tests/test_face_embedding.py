"""Precomputed ArcFace embeddings (`--face-embed`, a request's `face_embed`): the formats users save them in, read
exactly; anything else refused in one sentence, and never unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter.encoders import load_face_embedding
from ipadapter.errors import IPAdapterError


def _faces(n: int, dim: int = 512) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, dim))


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".pth"])
@pytest.mark.parametrize("faces", [1, 2])
def test_saved_embeddings_read_back_one_row_per_face(tmp_path: Path, suffix: str, faces: int) -> None:
    values = _faces(faces)  # float64, as numpy makes them: read as float32
    path = tmp_path / f"face{suffix}"
    if suffix == ".npy":
        np.save(path, values[0] if faces == 1 else values)
    else:
        torch.save(torch.from_numpy(values), path)
    got = load_face_embedding(path)
    assert got.dtype == torch.float32 and got.shape == (faces, 512)
    assert torch.equal(got, torch.from_numpy(values).float())
    assert torch.equal(load_face_embedding(str(path)), got)  # a path as text too


def test_in_memory_embeddings_and_another_width() -> None:
    values = _faces(2, dim=16)
    expected = torch.from_numpy(values).float()
    assert torch.equal(load_face_embedding(values, dim=16), expected)
    assert torch.equal(load_face_embedding(values.tolist(), dim=16), expected)
    assert torch.equal(load_face_embedding(torch.from_numpy(values), dim=16), expected)
    assert load_face_embedding(values[0].tolist(), dim=16).shape == (1, 16)


class _Payload:
    """Unpickling this writes a file: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_pickled_files_are_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    np.save(tmp_path / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)
    for name in ("evil.npy", "evil.pt"):
        with pytest.raises(IPAdapterError) as caught:
            load_face_embedding(tmp_path / name)
        assert str(caught.value).startswith(
            f"{tmp_path / name} is not a readable face embedding (.npy or tensor .pt): ")
    assert not marker.exists()


def test_wrong_sizes_and_missing_files_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(IPAdapterError) as caught:
        load_face_embedding(tmp_path / "none.npy")
    assert str(caught.value) == f"face embedding file not found: {tmp_path / 'none.npy'}"
    for values, shown in ((np.zeros(511), "torch.Size([511])"), (np.zeros((2, 300)), "torch.Size([2, 300])"),
                          (np.zeros(0), "torch.Size([0])")):
        with pytest.raises(IPAdapterError) as caught:
            load_face_embedding(values)
        assert str(caught.value) == f"a face embedding must hold 512 values per face, got {shown}"
    state = {"embedding": torch.zeros(512)}  # a tensor dict: loads (weights_only allows it), but is no tensor
    torch.save(state, tmp_path / "dict.pt")
    with pytest.raises(IPAdapterError) as caught:
        load_face_embedding(tmp_path / "dict.pt")
    assert str(caught.value) == f"a face embedding must hold 512 values per face, got {state!r}"
