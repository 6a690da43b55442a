"""The overlay plugin's start-up check: a real overlay mount under the root, and nothing left after."""

from __future__ import annotations

import os

import pytest

from pyctr.api.errdefs import FailedPrecondition
from pyctr.snapshotter import overlay
from tests.helpers.daemons import mounts_under


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_check_mounts_an_overlay_and_leaves_nothing(tmp_path: str) -> None:
    root = str(tmp_path)
    overlay.check_supported(root)
    assert os.listdir(root) == [] and mounts_under(root) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_check_says_why_overlay_cannot_mount(tmp_path: str) -> None:
    # Two lowerdirs under a ~2 KiB root make the options longer than the one page mount(2) takes.
    root = str(tmp_path)
    while len(root) < 2100:
        root = os.path.join(root, "d" * 200)
    os.makedirs(root)
    with pytest.raises(FailedPrecondition, match="overlay is not supported here: "):
        overlay.check_supported(root)
    assert os.listdir(root) == [] and mounts_under(str(tmp_path)) == []
