"""`sources.from_cache_or_hub`, the one way every loader reads a Hub id: from disk first without a request, the Hub
asked once (no retries) only when files are missing, so an uncached id offline fails in one line at once."""

from __future__ import annotations

import pytest

from ipadapter.errors import IPAdapterError
from ipadapter.sources import from_cache_or_hub
from tests import factories

REPO = "ipadapter-tests/some-model"


@pytest.fixture
def hub(monkeypatch):
    """Offline mode off, `model_info` stand-in: records each request and raises the exception in `hub["raise"]`
    (None: answers)."""
    import huggingface_hub
    from huggingface_hub import constants

    state: dict = {"asked": [], "raise": OSError("[Errno -2] Name or service not known")}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def model_info(repo_id, **kwargs):
        state["asked"].append((repo_id, kwargs.get("timeout")))
        if state["raise"] is not None:
            raise state["raise"]

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    return state


def _loader(fails_locally: bool):
    """A load whose local-only read raises as a library does for files not in the cache."""
    calls: list[bool] = []

    def load(local: bool) -> str:
        calls.append(local)
        if local and fails_locally:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return "loaded"

    return load, calls


def test_a_model_read_from_disk_asks_nothing(hub) -> None:
    load, calls = _loader(fails_locally=False)
    assert from_cache_or_hub(load, REPO, "the model") == "loaded"
    assert calls == [True] and hub["asked"] == []


def test_an_uncached_id_the_hub_serves_is_downloaded_after_one_request(hub) -> None:
    hub["raise"] = None
    load, calls = _loader(fails_locally=True)
    assert from_cache_or_hub(load, REPO, "the model") == "loaded"
    assert calls == [True, False] and hub["asked"] == [(REPO, 10)]


@pytest.mark.parametrize(("part", "shown", "command", "local"), [
    ({}, REPO, f"hf download {REPO}", "folder"),
    ({"subfolder": "models/enc"}, f"{REPO}/models/enc", f"hf download {REPO} --include 'models/enc/*'", "folder"),
    ({"subfolder": "models", "filename": "a.bin"}, f"{REPO}/models/a.bin", f"hf download {REPO} models/a.bin", "file"),
    ({"filename": "a.bin"}, f"{REPO}/a.bin", f"hf download {REPO} a.bin", "file"),
])
def test_an_uncached_id_the_hub_cannot_serve_is_one_line_naming_the_download(hub, part, shown, command, local) -> None:
    load, calls = _loader(fails_locally=True)
    with pytest.raises(IPAdapterError) as caught:
        from_cache_or_hub(load, REPO, "the model", **part)
    assert str(caught.value) == (f"the model {shown} is not in the local Hugging Face cache and the Hub cannot be "
                                 f"reached; download it once with network access ({command}) or give a local {local}")
    assert calls == [True] and len(hub["asked"]) == 1


@pytest.mark.parametrize(("env", "switch"), [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "True", "TRANSFORMERS_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE is set"),
    ({}, "huggingface_hub.constants.HF_HUB_OFFLINE is on"),
])
def test_offline_mode_is_named_and_nothing_is_sent(hub, tmp_path, monkeypatch, env, switch) -> None:
    """huggingface_hub's offline flag on (it reads it once, at import): the message says offline mode, not an
    unreachable Hub, names the variable that turned it on, and no request is sent, not even the one `model_info`."""
    from huggingface_hub import constants

    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    load, calls = _loader(fails_locally=True)
    with pytest.raises(IPAdapterError) as caught:
        from_cache_or_hub(load, REPO, "the model", subfolder="models/enc")
    assert str(caught.value) == (f"the model {REPO}/models/enc is not in the local Hugging Face cache and offline mode "
                                 f"is on ({switch}); download it once with network access and offline mode off "
                                 f"(hf download {REPO} --include 'models/enc/*') or give a local folder")
    assert calls == [True] and hub["asked"] == [] and sent == []


def test_huggingface_hubs_own_flag_decides_offline_mode(hub, monkeypatch) -> None:
    """huggingface_hub reads the variables once, at import, and sends requests by its flag alone: with the flag off
    the Hub is asked (and named unreachable) whatever the variables say now."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load, _ = _loader(fails_locally=True)
    with pytest.raises(IPAdapterError, match=f"^the model {REPO} is not in the local Hugging Face cache and the Hub "
                                             "cannot be reached; "):
        from_cache_or_hub(load, REPO, "the model")
    assert hub["asked"] == [(REPO, 10)]


def test_a_hub_that_has_no_such_model_says_so(monkeypatch) -> None:
    """The Hub answers 404 (its own session, as huggingface_hub sends every request): its first line, once."""
    import sys

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    sent = []

    def not_found(client, request, **kwargs):
        sent.append(str(request.url))
        http = sys.modules[type(request).__module__.split(".")[0]]  # the HTTP library huggingface_hub uses
        return http.Response(404, request=request, headers={"X-Error-Code": "RepoNotFound"})

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(type(get_session()), "send", not_found)
    load, _ = _loader(fails_locally=True)
    with pytest.raises(IPAdapterError) as caught:
        from_cache_or_hub(load, REPO, "the model")
    message = str(caught.value)
    assert message.startswith(f"could not load the model {REPO} from the Hub: ") and "\n" not in message
    assert "404" in message and [url for url in sent if "/api/models/" in url] == [
        f"https://huggingface.co/api/models/{REPO}"]


@pytest.mark.parametrize("source", ["{folder}", "./not/here", "/not/here"])
def test_a_local_path_is_never_looked_up_on_the_hub(hub, tmp_path, source) -> None:
    """A folder's own error (or a missing path's) is the loader's to word; it is no Hub id to ask about."""
    load, calls = _loader(fails_locally=True)
    with pytest.raises(OSError, match="couldn't connect"):
        from_cache_or_hub(load, source.format(folder=tmp_path), "the model")
    assert calls == [True] and hub["asked"] == []
