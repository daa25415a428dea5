"""Service settings: flags, config file, token from the environment, address checks."""
from __future__ import annotations

import argparse
import json

import pytest

from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.service import serve_cmd
from comfy_tetriserve.service.settings import ServiceConfig, is_loopback, parse_pairs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_the_config_file_and_the_token_comes_from_the_environment(tmp_path, monkeypatch):
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text(json.dumps({"devices": "sim:8", "port": 9000, "model": ["a=sim:flux"], "lease_s": 5}))
    monkeypatch.setenv("TETRISERVE_TOKEN", "from-env")
    cfg = serve_cmd.build_config(parse(["--config", str(cfg_file), "--port", "9100", "--model-dir", "/m1", "/m2"]))
    assert (cfg.devices, cfg.port, cfg.model, cfg.model_dir, cfg.lease_s) == ("sim:8", 9100, ("a=sim:flux",),
                                                                               ("/m1", "/m2"), 5)
    assert cfg.token == "from-env"
    assert serve_cmd.build_config(parse(["--token", "flag"])).token == "flag"
    cfg_file.write_text(json.dumps({"colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        serve_cmd.build_config(parse(["--config", str(cfg_file)]))


def test_validation():
    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert parse_pairs(("a=b", " c = d/e=f "), "model") == {"a": "b", "c": "d/e=f"}
    for bad in (("a",), ("=b",), ("a=",), ("a=b", "a=c")):
        with pytest.raises(InvalidRequest):
            parse_pairs(bad, "model")
    for bad in (dict(port=0), dict(lease_s=0), dict(max_steps=0), dict(model=("x",)), dict(host="10.0.0.1")):
        with pytest.raises(InvalidRequest):
            ServiceConfig(**bad).validate()
    ServiceConfig(host="10.0.0.1", token="t").validate()
