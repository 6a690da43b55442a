"""Which checkpoint and restore paths the Tasks service reads from a request's runc options."""

from __future__ import annotations

import os

import pytest

from pyctr.api import binaries
from pyctr.api._pb.containerd.runc.v1 import CheckpointOptions, Options
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import InvalidArgument
from pyctr.daemon.runtime import checkpoint


def test_runc_runtimes_by_name() -> None:
    assert checkpoint.is_runc("io.containerd.runc.v2") and checkpoint.is_runc("io.containerd.runc.v1")
    assert not checkpoint.is_runc("io.containerd.runcx.v2") and not checkpoint.is_runc(
        "io.containerd.kata.v2"
    )


def test_image_path_from_checkpoint_options() -> None:
    opts = PbAny(
        type_url="containerd.runc.v1.CheckpointOptions", value=bytes(CheckpointOptions(image_path="/x"))
    )
    assert checkpoint.image_path("io.containerd.runc.v2", opts) == "/x"
    assert checkpoint.image_path("io.containerd.runc.v2", None) == ""
    assert checkpoint.image_path("io.containerd.runc.v2", PbAny()) == ""
    # Another runtime's options are its own business, as with containerd.
    assert checkpoint.image_path("io.containerd.other.v1", opts) == ""
    with pytest.raises(InvalidArgument, match="invalid task checkpoint option"):
        checkpoint.image_path(
            "io.containerd.runc.v2", PbAny(type_url="containerd.runc.v1.Options", value=b"")
        )


def test_restore_path_from_create_options() -> None:
    opts = PbAny(type_url="containerd.runc.v1.Options", value=bytes(Options(criu_image_path="/ck")))
    assert checkpoint.restore_path("io.containerd.runc.v2", opts) == "/ck"
    assert (
        checkpoint.restore_path("io.containerd.runc.v2", PbAny(type_url="containerd.runc.v1.Options")) == ""
    )
    with pytest.raises(InvalidArgument, match="invalid task create option"):
        checkpoint.restore_path(
            "io.containerd.runc.v2", PbAny(type_url="containerd.runc.v1.CheckpointOptions")
        )


def test_criu_lookup(tmp_path: str) -> None:
    fake = f"{tmp_path}/criu"
    assert binaries.criu(fake) is None  # configured but absent
    with open(fake, "w") as f:
        f.write("#!/bin/sh\n")
    assert binaries.criu(fake) is None  # not executable
    os.chmod(fake, 0o755)
    assert binaries.criu(fake) == fake
    assert binaries.criu(str(tmp_path)) is None  # a directory
