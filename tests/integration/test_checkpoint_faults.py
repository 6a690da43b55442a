"""Creating a task from a checkpoint that cannot be restored: a clear error, and nothing left.

pyctrd on our shim, with real runc. The checkpoint blobs are written through the Content API like
any client's, then named in Tasks.Create, which unpacks them into the task's bundle before the
shim starts. Most of these fail before criu is involved and run on every host; the one that gets
as far as ``runc restore`` expects whichever refusal this host's criu gives.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from collections.abc import Iterator

import pytest

from pyctr.api import binaries
from pyctr.api._pb.containerd.services.containers.v1 import GetContainerRequest
from pyctr.api._pb.containerd.services.snapshots.v1 import MountsRequest
from pyctr.api._pb.containerd.services.tasks import v1 as tpb
from pyctr.api._pb.containerd.types import Descriptor
from pyctr.api.errdefs import ContainerdError, InvalidArgument, NotFound, NotImplementedErr
from pyctr.ctr import checkpoint
from pyctr.ctr.client import Client, rpc
from pyctr.ctr.contentio import write_blob
from tests.helpers import daemons, images
from tests.helpers.daemons import mounts_under
from tests.helpers.streams import wait_for
from tests.integration.test_restart import IMAGE, Env, running_env

SHIM = "containerd-shim-pyrunc-v2"


@pytest.fixture
def env(built_images: images.Images, ctr_bin: str) -> Iterator[Env]:
    with running_env(SHIM, built_images, ctr_bin) as e:
        yield e


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def create_from(env: Env, cid: str, blob: bytes | None, desc: Descriptor) -> ContainerdError | None:
    """Writes ``blob`` (if any) into the namespace's content, then Tasks.Create from ``desc``;
    returns the error, None when the task was created."""

    async def go() -> ContainerdError | None:
        with Client(env.d.address, env.ns, timeout=30) as c:
            if blob is not None:
                await write_blob(c, f"test-{cid}", blob, {})
            try:
                info = (await rpc(c, c.containers.get(GetContainerRequest(id=cid)))).container
                assert info is not None
                mounts = (
                    await c.snapshots.mounts(
                        MountsRequest(snapshotter=info.snapshotter, key=info.snapshot_key)
                    )
                ).mounts
                req = tpb.CreateTaskRequest(container_id=cid, rootfs=list(mounts), checkpoint=desc)
                await rpc(c, c.tasks.create(req))
            except ContainerdError as exc:
                return exc
            return None

    return asyncio.run(go())


def descriptor(data: bytes, media_type: str = checkpoint.MEDIA_TYPE_CHECKPOINT) -> Descriptor:
    import hashlib

    return Descriptor(
        media_type=media_type, digest=f"sha256:{hashlib.sha256(data).hexdigest()}", size=len(data)
    )


def assert_no_task_left(env: Env, cid: str) -> None:
    assert cid not in env.tasks()
    wait_for(lambda: cid not in env.shims(), timeout=10)
    bundle = os.path.join(env.bundles, cid)
    wait_for(lambda: not os.path.exists(bundle), timeout=5)
    assert mounts_under(bundle) == []
    assert not os.path.exists(os.path.join(env.workdirs, cid))


def test_unsupported_media_type_and_missing_blob(env: Env) -> None:
    env.ok("containers", "create", IMAGE, "c1", "sleep", "1000")
    data = tar_of({"inventory.img": b"x"})
    err = create_from(env, "c1", data, descriptor(data, "application/vnd.oci.image.layer.v1.tar"))
    assert isinstance(err, InvalidArgument) and "unsupported checkpoint type" in err.message, err
    err = create_from(env, "c1", None, descriptor(b"never written"))
    assert isinstance(err, NotFound), err
    assert_no_task_left(env, "c1")
    # The container is untouched: a plain task still runs on it.
    env.ok("tasks", "start", "-d", "c1")
    assert env.tasks()["c1"][1] == "RUNNING"


def test_checkpoint_that_escapes_its_directory_is_refused(env: Env, tmp_path: str) -> None:
    env.ok("containers", "create", IMAGE, "c2", "sleep", "1000")
    outside = os.path.join(env.d.root, "escaped")
    data = tar_of({"inventory.img": b"x", "../../../../escaped": b"pwned"})
    err = create_from(env, "c2", data, descriptor(data))
    assert isinstance(err, InvalidArgument), err
    assert not os.path.exists(outside)
    assert_no_task_left(env, "c2")


def test_restore_of_a_bogus_checkpoint_fails_clearly(env: Env) -> None:
    """criu's images are garbage: with criu, Create succeeds (nothing runs until Start, as with the
    Go shim) and Start says runc restore failed; without criu, Create refuses. Either way, a
    delete leaves nothing."""
    env.ok("containers", "create", IMAGE, "c3", "sleep", "1000")
    data = tar_of({"inventory.img": b"not a criu image", "descriptors.json": b"[]"})
    err = create_from(env, "c3", data, descriptor(data))
    if binaries.criu() is None:
        assert isinstance(err, NotImplementedErr) and "criu" in err.message, err
    else:
        assert err is None, err
        assert env.tasks()["c3"] == (0, "CREATED")
        r = env.ctr("tasks", "exec", "--exec-id", "e1", "c3", "true")
        assert r.returncode != 0 and "cannot exec in a created state" in r.stderr, r.stderr
        # ctr's `tasks start` always creates a task: pyctr's starts the created one.
        r = daemons.run([daemons.PYCTR, "-a", env.d.address, "-n", env.ns, "tasks", "start", "-d", "c3"])
        assert r.returncode != 0 and "OCI runtime restore failed" in r.stderr, r.stderr
        assert "criu-restore.log" in r.stderr
        assert env.tasks()["c3"] == (0, "CREATED")
        env.ok("tasks", "rm", "c3")
    assert_no_task_left(env, "c3")
