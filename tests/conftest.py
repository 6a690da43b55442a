from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.helpers import daemons, images, registry


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


@pytest.fixture(scope="session")
def built_images() -> Iterator[images.Images]:
    """The offline test images (busybox, multi-layer), built once per session."""
    for tool in ("umoci", "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        yield images.get()
    finally:
        images.discard()


@pytest.fixture(scope="session")
def image_registry(built_images: images.Images) -> Iterator[registry.Registry]:
    """docker-registry on 127.0.0.1 with library/busybox:latest and library/multi:latest pushed."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed")
    reg = registry.start()
    try:
        reg.push(built_images.busybox.layout, "library/busybox")
        reg.push(built_images.multi.layout, "library/multi")
        yield reg
    finally:
        reg.stop()
