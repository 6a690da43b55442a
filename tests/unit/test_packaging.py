"""The package list in pyproject.toml matches the tree (a wheel drops what is not listed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

from tests.helpers.daemons import REPO

FOLDERS = {"api", "daemon", "snapshotter", "shim", "ctr"}


def tree_packages() -> set[str]:
    found = set()
    for folder in FOLDERS:
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, REPO).replace(os.sep, ".")
                found.add("pyctr." + rel)
    return found


def test_every_package_is_listed() -> None:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    assert listed == tree_packages()


def test_import_layers_hold() -> None:
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "hack", "check_layers.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_layer_check_catches_an_upward_import(tmp_path: object) -> None:
    import ast

    sys.path.insert(0, os.path.join(REPO, "hack"))
    try:
        import check_layers
    finally:
        sys.path.pop(0)
    tree = ast.parse("from pyctr.daemon import plugin\nimport daemon.x\n")
    mods = [m for _, m in check_layers.imported_modules(tree, "pyctr.api.x")]
    assert mods == ["pyctr.daemon", "daemon.x"]
    assert "daemon" not in check_layers.ALLOWED["api"]
    assert "daemon" not in check_layers.ALLOWED["ctr"]
