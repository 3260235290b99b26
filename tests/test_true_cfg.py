"""`--true-cfg` is FLUX's: which transformer a base's model_index.json names (read from a folder or the local Hugging
Face cache, without a request), and the refusal for any other base, before or after loading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ipadapter.cli.true_cfg import TRUE_CFG_NOT_FLUX, index_transformer, true_cfg_kwargs
from ipadapter.errors import IPAdapterError
from tests import factories

FLUX = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}
SD15 = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}


def _base(folder, index: dict):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_the_transformer_a_local_base_names(tmp_path) -> None:
    assert index_transformer(str(_base(tmp_path / "flux", FLUX))) == "FluxTransformer2DModel"
    assert index_transformer(str(_base(tmp_path / "sd15", SD15))) == ""  # a UNet base
    assert index_transformer(None) == ""  # the bundled miniature model is a UNet base
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    assert index_transformer(str(tmp_path / "broken")) is None  # loading will say what is wrong


def test_a_hub_id_is_read_from_the_cache_and_an_uncached_one_is_left_to_loading(tmp_path, monkeypatch) -> None:
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/flux", _base(tmp_path / "flux", FLUX))
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/sd15", _base(tmp_path / "sd15", SD15))
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    assert index_transformer("ipadapter-tests/flux") == "FluxTransformer2DModel"
    assert index_transformer("ipadapter-tests/sd15") == ""
    assert index_transformer("ipadapter-tests/not-cached") is None
    assert index_transformer("not/a/repo/id") is None
    assert [url for url in sent if "ipadapter-tests" in url] == []


def test_true_cfg_keyword_only_for_a_flux_pipeline() -> None:
    flux_like = SimpleNamespace(transformer=type("FluxTransformer2DModel", (), {})())
    assert true_cfg_kwargs(None, SimpleNamespace()) == {}
    assert true_cfg_kwargs(4.0, flux_like) == {"true_cfg_scale": 4.0}
    for pipe in (SimpleNamespace(unet=object()), SimpleNamespace(transformer=type("SD3Transformer2DModel", (), {})())):
        with pytest.raises(IPAdapterError) as caught:
            true_cfg_kwargs(4.0, pipe)
        assert str(caught.value) == TRUE_CFG_NOT_FLUX == "--true-cfg is FLUX's option; other bases take --guidance"


def test_an_index_is_read_as_utf8_whatever_the_locale(tmp_path) -> None:
    """A model_index.json holding non-ASCII text (a path, a name), read in a child process whose default text
    encoding is ASCII (`factories.ascii_locale_env`). The child imports `ipadapter.cli.true_cfg` without running the
    package's `__init__` (a bare package object for `ipadapter`): torch and the rest of the package, which it would
    import, are not what this tests and took nine tenths of the child's 5 s."""
    import subprocess
    import sys
    from pathlib import Path

    import ipadapter

    (tmp_path / "flux").mkdir()
    index = json.dumps({**FLUX, "_name_or_path": "/modèles/flux-犬"}, ensure_ascii=False)
    (tmp_path / "flux" / "model_index.json").write_bytes(index.encode("utf-8"))
    env = factories.ascii_locale_env()
    code = ("import sys, types\n"
            "package = types.ModuleType('ipadapter')\n"
            "package.__path__ = [sys.argv[2]]\n"
            "sys.modules['ipadapter'] = package\n"
            "from ipadapter.cli.true_cfg import index_transformer\n"
            "print(index_transformer(sys.argv[1]))")
    package = str(Path(ipadapter.__file__).parent)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "flux"), package], env=env, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "FluxTransformer2DModel"
