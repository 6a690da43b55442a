from __future__ import annotations

import tomllib

import pytest

from pyctr.daemon import config
from pyctr.daemon.builtins import plugin_defaults


def test_default_config_round_trips() -> None:
    text = config.to_toml(config.Config(), plugin_defaults())
    parsed = config.from_dict(tomllib.loads(text))
    assert parsed.plugins == plugin_defaults()
    parsed.plugins = {}
    assert parsed == config.Config()
    assert parsed.ttrpc_address == "/run/pyctrd/pyctrd.sock.ttrpc"


def test_file_values_are_applied(tmp_path: object) -> None:
    cfg = config.from_dict(
        {
            "root": "/tmp/r",
            "state": "/tmp/s",
            "grpc": {"address": "/tmp/s/x.sock", "uid": 5},
            "ttrpc": {"address": "/tmp/s/t.sock"},
            "debug": {"level": "debug"},
            "disabled_plugins": ["io.containerd.grpc.v1.leases"],
            "plugins": {"io.containerd.gc.v1.scheduler": {"pause_threshold": 0.02}},
        }
    )
    assert cfg.root == "/tmp/r" and cfg.grpc.uid == 5 and cfg.ttrpc_address == "/tmp/s/t.sock"
    assert cfg.disabled_plugins == ["io.containerd.grpc.v1.leases"]
    assert cfg.plugins["io.containerd.gc.v1.scheduler"] == {"pause_threshold": 0.02}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"version": 1}, "unsupported config version"),
        ({"bogus": 1}, "unknown configuration keys: bogus"),
        ({"grpc": {"adress": "/x"}}, "unknown key grpc.adress"),
        ({"grpc": {"uid": "root"}}, "grpc.uid: expected int"),
        ({"root": 5}, "root: expected str"),
        ({"grpc": {"uid": True}}, "grpc.uid: expected int"),
    ],
)
def test_bad_config_is_rejected_clearly(data: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(data)


def test_invalid_toml_names_the_file(tmp_path: object) -> None:
    import pathlib

    p = pathlib.Path(str(tmp_path)) / "bad.toml"
    p.write_text("version = = 2\n")
    with pytest.raises(config.ConfigError, match=r"bad\.toml"):
        config.load(str(p))
