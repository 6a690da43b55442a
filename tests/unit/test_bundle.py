"""Task bundles on disk: what a restarted daemon finds in its state directory."""

from __future__ import annotations

import os

from pyctr.daemon.runtime import bundle


def test_any_left_sees_only_real_bundles(tmp_path: str) -> None:
    state = os.path.join(tmp_path, bundle.STATE_DIR)
    assert not bundle.any_left(state)  # never created: a first start
    os.makedirs(os.path.join(state, "default"))
    assert not bundle.any_left(state)  # a namespace without tasks
    os.makedirs(os.path.join(state, "default", ".c1"))  # an interrupted delete
    open(os.path.join(state, "stray-file"), "w").close()
    assert not bundle.any_left(state)
    os.makedirs(os.path.join(state, "moby", "c2"))
    assert bundle.any_left(state)
    assert [(b.namespace, b.id) for b in bundle.existing(state, os.path.join(tmp_path, "root"))] == [
        ("moby", "c2")
    ]
