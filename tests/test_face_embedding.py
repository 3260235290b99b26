"""Precomputed ArcFace embeddings (`--face-embed`, a request's `face_embed`): the formats users save them in, read
exactly; anything else refused in one sentence, and never unpickled."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter.encoders import load_face_embedding
from ipadapter.errors import IPAdapterError


def _faces(n: int, dim: int = 512) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, dim))


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".pth", ".NPY"])
@pytest.mark.parametrize("faces", [1, 2])
def test_saved_embeddings_read_back_one_row_per_face(tmp_path: Path, suffix: str, faces: int) -> None:
    values = _faces(faces)  # float64, as numpy makes them: read as float32
    path = tmp_path / f"face{suffix}"
    if suffix.lower() == ".npy":
        with path.open("wb") as f:  # np.save would add ".npy" to a name ending in ".NPY"
            np.save(f, values[0] if faces == 1 else values)
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


def test_pickled_file_is_refused_even_when_the_environment_allows_unpickling(tmp_path: Path, monkeypatch) -> None:
    """torch honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (unpickle anything) unless the call sets `weights_only`
    itself: with the variable set, a pickled .pt file must still be refused unopened."""
    marker = tmp_path / "ran.txt"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(IPAdapterError) as caught:
        load_face_embedding(tmp_path / "evil.pt")
    prefix = f"{tmp_path / 'evil.pt'} is not a readable face embedding (.npy or tensor .pt): "
    assert str(caught.value).startswith(prefix)
    assert not marker.exists()


def _as_saved_on_a_gpu(src: Path, dst: Path) -> None:
    """Rewrite a CPU `torch.save` file as one saved from `cuda:0`: torch records each storage's device as a string
    in `data.pkl` (pickle protocol 2: BINUNICODE, 4-byte little-endian length; repeats may be memo references)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert body.count(b"X\x03\x00\x00\x00cpu") >= 1
                body = body.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info.filename, body)


def test_embedding_saved_from_a_gpu_loads_on_the_cpu(tmp_path: Path) -> None:
    """A tensor saved from a GPU names `cuda:0` in the file; it is read onto the CPU (torch itself refuses to restore
    it on a machine without CUDA unless told where to map it)."""
    values = torch.from_numpy(_faces(1)).float()
    torch.save(values, tmp_path / "cpu.pt")
    _as_saved_on_a_gpu(tmp_path / "cpu.pt", tmp_path / "gpu.pt")
    assert torch.equal(torch.load(tmp_path / "gpu.pt", map_location="cpu", weights_only=True), values)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    got = load_face_embedding(tmp_path / "gpu.pt")
    assert got.device == torch.device("cpu") and torch.equal(got, values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_embedding_is_one_sentence(tmp_path: Path, bad: float) -> None:
    """NaN or infinity in an ArcFace embedding would make every generated pixel NaN: refused before anything runs."""
    values = _faces(1)
    values[0, 3] = bad
    np.save(tmp_path / "face.npy", values)
    for source in (tmp_path / "face.npy", values.tolist()):
        with pytest.raises(IPAdapterError) as caught:
            load_face_embedding(source)
        assert str(caught.value) == "a face embedding must hold finite values (it has NaN or infinity)"


def test_a_damaged_embedding_file_says_what_is_wrong_with_it(tmp_path: Path) -> None:
    """The reason after the file's name: a .npy cut short quotes numpy's own first line; a torch file that asks for
    code quotes torch's sentence naming the global; a torch file cut short is torn, not code."""
    import io

    saved = io.BytesIO()
    np.save(saved, np.zeros(512, np.float32))
    (tmp_path / "cut.npy").write_bytes(saved.getvalue()[:200])
    with pytest.raises(ValueError) as numpy_says:
        np.load(io.BytesIO((tmp_path / "cut.npy").read_bytes()), allow_pickle=False)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Payload(tmp_path / "ran.txt"), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError) as torch_says:
        torch.load(tmp_path / "evil.pt", weights_only=True)
    torch.save(torch.zeros(512), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    reasons = {}
    for name in ("cut.npy", "evil.pt", "cut.pt"):
        with pytest.raises(IPAdapterError) as caught:
            load_face_embedding(tmp_path / name)
        prefix = f"{tmp_path / name} is not a readable face embedding (.npy or tensor .pt): "
        assert str(caught.value).startswith(prefix)
        reasons[name] = str(caught.value)[len(prefix):]
    assert reasons["cut.npy"] == str(numpy_says.value).splitlines()[0]
    code = "its pickle carries code or objects other than tensors ("
    assert reasons["evil.pt"].startswith(code) and reasons["evil.pt"].endswith(")")
    named = reasons["evil.pt"][len(code):-1]  # torch's sentence naming the global, whole
    assert named.startswith("GLOBAL ") and f" {named}." in str(torch_says.value)
    assert reasons["cut.pt"] == "truncated or corrupt"
    assert not (tmp_path / "ran.txt").exists()
