"""The same command under `accelerate launch` with 2 CPU processes (gloo): both train, in sync, one checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ipadapter import load_adapter
from tests import factories

TIMEOUT_S = 240  # ~25 s here on a loaded 2-core machine


def _free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the OS picked (bind to port 0) and this test released is
    in that range, and in the seconds the launcher takes to start the kernel may hand it to any other socket (an
    outgoing connection, a listener on port 0); one below the range is only taken by a bind that names it."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.is_file() else 32768
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every interface, as the launcher's TCPStore binds
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port below {low}")


def _launch(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the launcher with a deadline. Past it, the workers print their Python stacks (faulthandler, on SIGABRT) into
    the failure message and every process of the run is killed: torchrun starts each worker in a session of its own,
    so killing the launcher alone would leave them running."""
    import psutil  # accelerate's own dependency

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**env, "PYTHONFAULTHANDLER": "1"})
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        workers = launcher.children(recursive=True)
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
        psutil.wait_procs(workers, timeout=10)
        for p in (*workers, launcher):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        output, _ = proc.communicate()
        stacks = "\n".join(line for line in output.splitlines() if not line.startswith("Extension modules"))
        raise AssertionError(f"the 2-process run took over {TIMEOUT_S} s; its workers' stacks:\n{stacks[-12000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


def _train_in_two_processes(train: list[str], out: Path, cwd: Path) -> None:
    """`ipadapter train` under `accelerate launch` on 2 CPU processes (gloo), and what its step-2 checkpoint must
    show: each process read its own samples, one state holds both cursors, no pickles, and the averaged gradients
    left the replicas equal."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "ipadapter.cli.main", *train, "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = _launch(command, env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:]
    state_dir = out / "checkpoints" / "state-00000002"
    state = json.loads((state_dir / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and len(state["data"]) == 2
    assert all(d["epoch"] > 0 or d["pos"] >= 4 for d in state["data"])  # each process read its own ≥ 4 samples
    assert (state_dir / "rng-0.safetensors").is_file() and (state_dir / "rng-1.safetensors").is_file()
    assert not list(state_dir.glob("*.pkl"))  # no pickles in a checkpoint
    a, b = state["weight_checksums"]
    assert a == b  # gradients were averaged: the replicas hold the same weights


def _logged_loss_is_the_mean(train: list[str], out: Path, one: Path, within: tuple[float, float]) -> None:
    """The loss a 2-process run logged is the mean over the processes of each one's loss (accelerate's reduce,
    "mean"), not their sum: the same run in one process (written to `one`) logs a loss of the same size, each step's
    ratio `within` the bounds (each is an MSE against unit-variance noise)."""
    from ipadapter.cli.main import main
    from ipadapter.train.model_folder import read_losses

    assert main([*train, "--output", str(one)]) == 0
    for (step, two), (_, single) in zip(read_losses(out), read_losses(one), strict=True):
        assert within[0] < two / single < within[1], (step, two, single)


def test_two_processes_train_in_sync(tmp_path, fresh_accelerate_state) -> None:
    base, encoder = factories.write_base(tmp_path / "base"), factories.write_image_encoder(tmp_path / "enc")
    data = factories.write_images(tmp_path / "data", 6, corrupt=1)
    out = tmp_path / "out"
    train = ["train", "--base", str(base), "--image-encoder", str(encoder), "--data", str(data),
             "--resolution", str(factories.RES), "--batch-size", "2", "--max-steps", "2", "--num-workers", "0",
             "--learning-rate", "1e-3"]
    _train_in_two_processes(train, out, tmp_path)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    assert load_adapter(out / "ip-adapter.safetensors", unet).config.variant == "base"
    _logged_loss_is_the_mean(train, out, tmp_path / "one", (0.7, 1.3))


def test_two_processes_train_an_sd3_adapter_in_sync(tmp_path, fresh_accelerate_state) -> None:
    """A transformer run (SD 3 here; FLUX takes the same path) under `accelerate launch`, its feature cache built by
    both processes and trained from: what every 2-process run shows (`_train_in_two_processes`), a cache holding every
    good sample once, a file diffusers' layout reads, and the loss logged is the mean of the processes' (the same
    size as one process's, which trains from the same cache)."""
    from diffusers import SD3Transformer2DModel

    from ipadapter.dit.checkpoint import load_dit_adapter
    from tests import dit_factories as df

    base = df.save_sd3_base(tmp_path / "base")
    data = factories.write_images(tmp_path / "data", 6, corrupt=1)
    out = tmp_path / "out"
    train = ["train", "--variant", "sd3", "--base", str(base), "--image-encoder", str(base / "image_encoder"),
             "--data", str(data), "--resolution", "16", "--batch-size", "2", "--max-steps", "2", "--num-workers", "0",
             "--learning-rate", "1e-3", "--cache", str(tmp_path / "cache")]
    _train_in_two_processes(train, out, tmp_path)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["rows"] == 6 and sum(index["skipped"].values()) == 1  # six good images, one corrupt
    assert {f["file"][:8] for f in index["files"]} == {"part-000", "part-001"}  # each process encoded its share
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer")
    assert load_dit_adapter(out / "ip-adapter.safetensors", transformer).config.variant == "sd3"
    _logged_loss_is_the_mean(train, out, tmp_path / "one", (0.5, 2.0))
