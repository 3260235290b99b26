"""Random number generator state of one training process, in safetensors rather than a pickle.

accelerate stores the RNG of every process as `random_states_<rank>.pkl`, and on resume it quietly skips a file
it cannot read. A resumed run is only identical to an uninterrupted one with its RNG restored, and a checkpoint
should never have to be unpickled, so each process writes `rng-<rank>.safetensors` instead: Python's Mersenne
Twister, NumPy's legacy global generator, torch's CPU generator and, where present, each CUDA device's. A file that
cannot be read, or holds state of the wrong size, is refused with its name.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from ipadapter.atomic import save_safetensors
from ipadapter.errors import IPAdapterError, first_clause

_PY_WORDS = 625  # random.getstate()[1]: 624 Mersenne Twister words and the position
_NP_WORDS = 624


def rng_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng-{rank}.safetensors"


def capture() -> dict[str, torch.Tensor]:
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(words, dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return tensors


def save(folder: str | Path, rank: int) -> Path:
    return save_safetensors(capture(), rng_file(folder, rank))


def read(folder: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """The saved state, checked for the expected parts and sizes; nothing is restored yet."""
    from safetensors.torch import load_file

    path = rng_file(folder, rank)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise IPAdapterError(f"{path} is missing: this state cannot be resumed exactly") from None
    except (SafetensorError, OSError, RuntimeError) as err:
        raise IPAdapterError(f"{path} is not a readable RNG state ({first_clause(str(err), 120)})") from None
    expected = {"python": (_PY_WORDS,), "numpy_keys": (_NP_WORDS,), "numpy_pos": (2,), "numpy_gauss": (1,),
                "torch": tuple(torch.get_rng_state().shape)}
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            raise IPAdapterError(f"{path} is not a valid RNG state ({key} missing or of the wrong size)")
    if tensors.get("python_gauss", torch.empty(2)).numel() > 1:
        raise IPAdapterError(f"{path} is not a valid RNG state (python_gauss of the wrong size)")
    return tensors


def restore(folder: str | Path, rank: int) -> None:
    tensors = read(folder, rank)
    gauss = tensors["python_gauss"].tolist()
    try:
        random.setstate((3, tuple(tensors["python"].tolist()), gauss[0] if gauss else None))
        pos, has_gauss = tensors["numpy_pos"].tolist()
        np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                             float(tensors["numpy_gauss"][0])))
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available() and "cuda" in tensors:
            torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:
        raise IPAdapterError(f"{rng_file(folder, rank)} is not a valid RNG state ({err})") from None
