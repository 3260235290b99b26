"""The same command under `accelerate launch` with 2 CPU processes (gloo): both train, in sync, one checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from ipadapter import load_adapter
from tests import train_factories as tf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_sync(tmp_path) -> None:
    base, encoder = tf.write_base(tmp_path / "base"), tf.write_image_encoder(tmp_path / "enc")
    data = tf.write_images(tmp_path / "data", 6, corrupt=1)
    out = tmp_path / "out"
    def command() -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()),
                "-m", "ipadapter.cli.main", "train", "--base", str(base), "--image-encoder", str(encoder),
                "--data", str(data), "--output", str(out), "--resolution", str(tf.RES), "--batch-size", "2",
                "--max-steps", "2", "--num-workers", "0", "--learning-rate", "1e-3"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # ~15 s here. One gloo rendezvous in a full CI-like run hung once (not reproduced in isolation, under investigation):
    # a bounded wait and one fresh attempt on a new port keep a hung rendezvous from hanging the suite.
    for attempt in range(2):
        try:
            proc = subprocess.run(command(), capture_output=True, text=True, timeout=150, env=env)
            break
        except subprocess.TimeoutExpired as err:
            if attempt:
                raise AssertionError(f"2-process run timed out twice; output tail:\n{(err.stderr or b'')[-3000:]!r}") from None
            shutil.rmtree(out, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state_dir = out / "checkpoints" / "state-00000002"
    state = json.loads((state_dir / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and len(state["data"]) == 2
    assert all(d["epoch"] > 0 or d["pos"] >= 4 for d in state["data"])  # each process read its own ≥ 4 samples
    assert (state_dir / "random_states_0.pkl").is_file() and (state_dir / "random_states_1.pkl").is_file()
    a, b = state["weight_checksums"]
    assert a == b  # gradients were averaged: the replicas hold the same weights
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    assert load_adapter(out / "ip-adapter.safetensors", unet).config.variant == "base"
