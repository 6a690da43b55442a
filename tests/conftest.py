from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.helpers import daemons


@pytest.fixture
def pyctrd() -> Iterator[daemons.Daemon]:
    """A fresh pyctrd on its own root, state and socket."""
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture(scope="session")
def containerd() -> Iterator[daemons.Daemon]:
    """Debian's containerd on private paths: the reference for interop comparisons."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd and ctr are not installed (make setup installs them as root)")
    d = daemons.start_containerd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture(scope="session")
def ctr_bin() -> str:
    path = shutil.which("ctr")
    if path is None:
        pytest.skip("the real Go ctr is not installed (make setup installs containerd as root)")
    return path
