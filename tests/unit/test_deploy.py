"""deploy/ stays true: the shipped config is what ``pyctrd config default`` prints."""

from __future__ import annotations

import os
import subprocess

from tests.helpers.daemons import PYCTRD, REPO


def test_shipped_config_is_the_default() -> None:
    out = subprocess.run([PYCTRD, "config", "default"], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(REPO, "deploy", "config.toml")) as f:
        assert f.read() == out


def test_unit_keeps_shims_alive_across_restarts() -> None:
    with open(os.path.join(REPO, "deploy", "pyctrd.service")) as f:
        unit = f.read()
    assert "KillMode=process" in unit
    assert "Type=notify" in unit
