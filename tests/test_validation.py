"""`ipadapter.validation`'s rules written out: sizes on the base's step (a lone side keeps the base's aspect ratio,
the suggestion is the multiples either side), UTF-8 text files (the first bad byte's line), the pixel limit's
environment variable. Every sentence is asserted whole: the CLI prints it as the one line of an error."""

from __future__ import annotations

import os

import pytest

from ipadapter import IPAdapterError
from ipadapter.validation import generation_size, max_pixels, read_utf8

LANDSCAPE = (1024, 768)  # a base whose default is 4:3


@pytest.mark.parametrize("width, height, expected", [
    (None, None, (1024, 768)),
    (640, 480, (640, 480)),
    (512, None, (512, 384)),       # 512 · 3/4
    (None, 384, (512, 384)),       # 384 · 4/3
    (520, None, (520, 392)),       # 390 rounded to the step: 392
    (None, 104, (136, 104)),       # 138.7 → 136
    (8, None, (8, 8)),             # 6 rounds to 8, never below one step
])
def test_a_lone_side_keeps_the_bases_aspect_on_its_step(width, height, expected) -> None:
    assert generation_size(width, height, 8, LANDSCAPE) == expected


@pytest.mark.parametrize("width, height, message", [
    (1, 64, "--width 1 does not fit this base model: sizes are multiples of 8; try 8"),
    (64, 33, "--height 33 does not fit this base model: sizes are multiples of 8; try 32 or 40"),
    (None, 5, "--height 5 does not fit this base model: sizes are multiples of 8; try 8"),
    (0, None, "--width must be a positive number of pixels, got 0"),
    (64, -8, "--height must be a positive number of pixels, got -8"),
])
def test_a_size_off_the_step_names_the_flag_and_the_multiples_either_side(width, height, message) -> None:
    with pytest.raises(IPAdapterError) as err:
        generation_size(width, height, 8, LANDSCAPE)
    assert str(err.value) == message


def test_a_text_file_that_is_not_utf8_names_the_byte_and_its_line(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes('{"a": 1}\n{"b": "café"}\n'.encode("utf-8") + "{\"c\": \"é\"}\n".encode("latin-1"))
    with pytest.raises(IPAdapterError) as err:
        read_utf8(path, "manifest")
    bad = len('{"a": 1}\n{"b": "café"}\n'.encode("utf-8")) + len('{"c": "')
    assert str(err.value) == f"manifest {path} is not UTF-8 text (byte {bad}, line 3); save it as UTF-8"
    path.write_text('{"a": "café"}\n', encoding="utf-8")
    assert read_utf8(path, "manifest") == '{"a": "café"}\n'
    with pytest.raises(IPAdapterError) as err:
        read_utf8(tmp_path / "none.jsonl", "manifest")
    assert str(err.value) == f"manifest not found: {tmp_path / 'none.jsonl'}"


@pytest.mark.parametrize("value, expected", [("", 4096 * 4096), ("1000", 1000), ("2.5e3", 2500), (" 64 ", 64),
                                             ("1", 1)])
def test_the_pixel_limit_comes_from_the_environment(monkeypatch, value, expected) -> None:
    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", value)
    assert max_pixels() == expected


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_a_pixel_limit_that_is_not_a_positive_number_is_refused(monkeypatch, value) -> None:
    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", value)
    with pytest.raises(IPAdapterError) as err:
        max_pixels()
    assert str(err.value) == f"IPADAPTER_MAX_PIXELS must be a positive number of pixels, got {value!r}"


def test_an_output_file_may_replace_a_file_but_not_a_pipe_or_a_folder(tmp_path) -> None:
    from ipadapter.validation import output_file

    (tmp_path / "old.png").write_bytes(b"x")
    assert output_file(tmp_path / "old.png", "--out", ".png") == tmp_path / "old.png"
    assert output_file(tmp_path / "new" / "a.png", "--out", ".png") == tmp_path / "new" / "a.png"  # made later
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    for name, message in (("pipe.png", f"--out {tmp_path / 'pipe.png'} exists and is not a regular file"),
                          ("dir.png", f"--out {tmp_path / 'dir.png'} is a folder; name a file inside it"),
                          ("a.jpg", f"--out must name a .png file, got {tmp_path / 'a.jpg'}")):
        with pytest.raises(IPAdapterError) as err:
            output_file(tmp_path / name, "--out", ".png")
        assert str(err.value) == message
    assert not (tmp_path / "new").exists()  # nothing is created while checking


def test_an_output_under_a_file_names_the_output_and_the_file(tmp_path) -> None:
    from ipadapter.validation import output_file

    (tmp_path / "afile").write_text("x")
    with pytest.raises(IPAdapterError) as err:
        output_file(tmp_path / "afile" / "sub" / "out.png", "--out", ".png")
    assert str(err.value) == f"--out {tmp_path / 'afile' / 'sub' / 'out.png'}: {tmp_path / 'afile'} is a file, not a folder"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_file_is_refused_even_where_os_access_says_yes() -> None:
    """/proc takes no new file from anyone, yet os.access says root may write there: the check makes a file."""
    from ipadapter.validation import output_folder

    with pytest.raises(OSError):  # the truth, from an actual write
        open("/proc/ipadapter-write-test", "x").close()
    with pytest.raises(IPAdapterError) as err:
        output_folder("/proc/run/out", "--out")
    assert str(err.value) == "--out /proc/run/out: the folder /proc is not writable"


def test_a_read_only_folder_is_refused_exactly_when_a_write_there_fails(tmp_path) -> None:
    """Mode 0o500 stops a user but not root (which may write there): the check agrees with an actual write, whoever
    runs it, and leaves nothing behind."""
    from ipadapter.validation import output_folder

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        try:
            (folder / "written").touch()
            (folder / "written").unlink()
            writable = True
        except OSError:
            writable = False
        if writable:
            assert output_folder(folder / "new", "--out") == folder / "new"
        else:
            with pytest.raises(IPAdapterError) as err:
                output_folder(folder / "new", "--out")
            assert str(err.value) == f"--out {folder / 'new'}: the folder {folder} is not writable"
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("cuda", [True, False])
def test_the_default_device_is_cuda_when_there_is_one(monkeypatch, cuda) -> None:
    import torch

    from ipadapter.validation import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert check_device(None) == ("cuda" if cuda else "cpu")


@pytest.mark.parametrize("device, message", [
    ("cuda:2", "--device cuda:2: this machine has 2 CUDA device(s)"),
    ("mps", "--device mps: MPS is not available on this machine (use --device cpu)"),
    ("meta", "unsupported device 'meta'; use cpu, cuda, cuda:N or mps"),
    ("tpu9", "unknown device 'tpu9'; use cpu, cuda, cuda:N or mps"),
])
def test_a_device_this_machine_lacks_is_named(monkeypatch, device, message) -> None:
    import torch

    from ipadapter.validation import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(IPAdapterError) as err:
        check_device(device)
    assert str(err.value) == message
    assert check_device("cuda:1") == "cuda:1"


def test_an_mps_machine_may_use_mps(monkeypatch) -> None:
    import torch

    from ipadapter.validation import check_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == "mps"


def test_the_pixel_sentence_gives_both_sizes_in_exact_pixels(monkeypatch) -> None:
    """Exact counts: in megapixels one pixel over the limit read as equal to it ("1.1 MP; limited to 1.1 MP")."""
    from ipadapter.validation import check_pixels

    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", "10")  # a limit given in the call wins over the environment
    with pytest.raises(IPAdapterError) as err:
        check_pixels(1000, 1050, "ref.png", limit=1_000_000)
    assert str(err.value) == ("ref.png is 1000x1050 px (1,050,000 pixels); the limit is 1,000,000 pixels "
                              "(set IPADAPTER_MAX_PIXELS to allow more)")
    with pytest.raises(IPAdapterError) as err:
        check_pixels(1_050_001, 1, "wide.png", limit=1_050_000)
    assert "(1,050,001 pixels); the limit is 1,050,000 pixels" in str(err.value)
    check_pixels(1000, 1050, "ref.png", limit=1_050_000)


def test_seeds_and_non_negative_values_at_their_bounds() -> None:
    from ipadapter.validation import MAX_SEED, check_not_negative, check_seed

    assert check_seed(0) == 0 and check_seed(MAX_SEED) == 2**64 - 1
    check_not_negative([("--scale", 0.0), ("--guidance", 0.5), ("--s-scale", None)])
    with pytest.raises(IPAdapterError) as err:
        check_not_negative([("--scale", 1.0), ("--guidance", -0.25)])
    assert str(err.value) == "--guidance must not be negative, got -0.25"


def test_counts_at_their_bound() -> None:
    from ipadapter.validation import check_counts

    check_counts([("--steps", 1), ("--limit", None)])
    with pytest.raises(IPAdapterError) as err:
        check_counts([("--steps", 2), ("--samples", 0), ("--limit", -1)])
    assert str(err.value) == "--samples must be at least 1, got 0"


def test_hub_ids_have_one_slash_unless_subfolders_are_allowed(tmp_path) -> None:
    from ipadapter.validation import model_source

    assert model_source("owner/name", "--base") == "owner/name"
    assert model_source("owner/name/sub/folder", "--image-encoder", subfolders=True) == "owner/name/sub/folder"
    assert model_source(str(tmp_path), "--base") == str(tmp_path)  # an existing path, whatever its shape
    with pytest.raises(IPAdapterError) as err:
        model_source("owner/name/extra", "--base")
    assert str(err.value) == ("--base not found: owner/name/extra (no such file or folder; a Hub model id has the form "
                              "owner/name)")


def test_a_folder_that_takes_files_but_keeps_them_is_writable(tmp_path, monkeypatch) -> None:
    """An append-only folder (chattr +a, some FUSE mounts) lets a file be made but not removed: writing there works,
    so the folder is accepted. Where the system makes unnamed files (Linux) the probe is one, and nothing is left."""
    import os

    from ipadapter import validation

    if not getattr(os, "O_TMPFILE", 0):
        pytest.skip("this system makes no unnamed files")

    def refused(path):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(validation.os, "unlink", refused)
    assert validation.output_folder(tmp_path / "new", "--out") == tmp_path / "new"
    assert list(tmp_path.iterdir()) == []


def test_without_unnamed_files_the_probe_is_a_named_file_removed_after(tmp_path, monkeypatch) -> None:
    """A file system without O_TMPFILE: the named probe decides, and is removed; in an append-only folder it stays
    (the only trace), and the folder is still accepted."""
    import os

    from ipadapter import validation

    real_open = os.open

    def no_unnamed(path, flags, *args):
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(95, "Operation not supported", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(validation.os, "open", no_unnamed)
    assert validation.output_folder(tmp_path / "a", "--out") == tmp_path / "a"
    assert list(tmp_path.iterdir()) == []

    def refused(path):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(validation.os, "unlink", refused)
    assert validation.output_folder(tmp_path / "b", "--out") == tmp_path / "b"
    assert [p.name.startswith(".ipadapter-write-probe-") for p in tmp_path.iterdir()] == [True]
