"""Garbage collection of snapshots: what keeps a snapshot, and that collected ones leave the disk.

Snapshots are made through the gRPC API (``ctr snapshots prepare`` would add a gc.root label),
under leases so that no collection can take them before the test means it to. Every test runs
on pyctrd and, as the reference, on containerd, each in a namespace of its own. A collection is
forced with ``Leases.Delete(sync=true)`` of a throwaway lease, which returns after a GC run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from grpclib import Status as GrpcStatus
from grpclib.exceptions import GRPCError

from pyctr.api import namespaces
from pyctr.api._pb.containerd.services.containers import v1 as containers_pb
from pyctr.api._pb.containerd.services.leases import v1 as leases_pb
from pyctr.api._pb.containerd.services.snapshots import v1 as snapshots_pb
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.ctr.client import Client
from tests.helpers import daemons, images

SNAPSHOTTER = "overlayfs"
BACKEND = os.path.join("io.containerd.snapshotter.v1.overlayfs", "snapshots")
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
GC_ROOT = "containerd.io/gc.root"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot.overlayfs"


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture(params=["pyctrd", "containerd"])
def api(request: pytest.FixtureRequest, pyd: daemons.Daemon) -> Api:
    d = pyd if request.param == "pyctrd" else request.getfixturevalue("containerd")
    return Api(d, f"gc-{uuid.uuid4().hex[:8]}")


class Api:
    """Blocking calls into one daemon's gRPC API, in one namespace."""

    def __init__(self, d: daemons.Daemon, ns: str) -> None:
        self.d, self.ns = d, ns

    def _call(self, stub_cls: type, method: str, request: Any, lease: str = "") -> Any:
        async def go() -> Any:
            with Client(self.d.address, self.ns, timeout=30) as c:
                md = {namespaces.GRPC_HEADER: self.ns}
                if lease:
                    md[namespaces.LEASE_HEADER] = lease
                stub = stub_cls(c.channel, timeout=30, metadata=md)
                return await getattr(stub, method)(request)

        return asyncio.run(go())

    # -- leases
    def lease(self) -> str:
        lease_id = f"lease-{uuid.uuid4().hex[:8]}"
        self._call(leases_pb.LeasesStub, "create", leases_pb.CreateRequest(id=lease_id))
        return lease_id

    def drop_lease(self, lease_id: str, sync: bool = True) -> None:
        self._call(leases_pb.LeasesStub, "delete", leases_pb.DeleteRequest(id=lease_id, sync=sync))

    def collect(self) -> None:
        """Force a collection: a sync delete returns after the GC run it triggered."""
        self.drop_lease(self.lease(), sync=True)

    # -- snapshots
    def prepare(self, key: str, parent: str = "", lease: str = "", **labels: str) -> list[Any]:
        req = snapshots_pb.PrepareSnapshotRequest(
            snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels
        )
        return list(self._call(snapshots_pb.SnapshotsStub, "prepare", req, lease).mounts)

    def commit(self, name: str, key: str, lease: str = "") -> None:
        req = snapshots_pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key)
        self._call(snapshots_pb.SnapshotsStub, "commit", req, lease)

    def remove(self, key: str) -> None:
        req = snapshots_pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key)
        self._call(snapshots_pb.SnapshotsStub, "remove", req)

    def exists(self, key: str) -> bool:
        try:
            req = snapshots_pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=key)
            self._call(snapshots_pb.SnapshotsStub, "stat", req)
        except GRPCError as exc:
            if exc.status == GrpcStatus.NOT_FOUND:
                return False
            raise
        return True

    def keys(self) -> set[str]:
        async def go() -> set[str]:
            with Client(self.d.address, self.ns, timeout=30) as c:
                out = set()
                req = snapshots_pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER)
                async for resp in c.snapshots.list(req):
                    out |= {i.name for i in resp.info}
                return out

        return asyncio.run(go())

    # -- containers
    def create_container(self, cid: str, snapshot_key: str) -> None:
        c = containers_pb.Container(
            id=cid,
            runtime=containers_pb.ContainerRuntime(name="io.containerd.runc.v2"),
            spec=PbAny(type_url=SPEC_URL, value=b"{}"),
            snapshotter=SNAPSHOTTER,
            snapshot_key=snapshot_key,
        )
        self._call(containers_pb.ContainersStub, "create", containers_pb.CreateContainerRequest(container=c))

    def delete_container(self, cid: str) -> None:
        self._call(containers_pb.ContainersStub, "delete", containers_pb.DeleteContainerRequest(id=cid))

    # -- the backend on disk
    def backend_dirs(self) -> set[str]:
        path = os.path.join(self.d.root, BACKEND)
        return set(os.listdir(path)) if os.path.isdir(path) else set()

    def ctr(self, ctr_bin: str, *args: str) -> str:
        r = daemons.run([ctr_bin, "-a", self.d.address, "-n", self.ns, *args], timeout=60)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout


def snapshot_dir(mounts: list[Any]) -> str:
    """The backend directory (``<root>/…/snapshots/<id>``) of an active snapshot, from its mounts."""
    m = mounts[0]
    if m.type == "bind":
        path = m.source
    else:
        path = next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))
    return os.path.basename(os.path.dirname(path))


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_unreferenced_snapshots_are_collected_after_a_deletion(api: Api) -> None:
    lease = api.lease()
    base_dir = snapshot_dir(api.prepare("base", lease=lease))
    api.commit("layer", "base", lease=lease)
    child_dir = snapshot_dir(api.prepare("child", "layer", lease=lease))
    rooted_dir = snapshot_dir(api.prepare("rooted", "layer", lease=lease, **{GC_ROOT: "yes"}))
    assert {base_dir, child_dir, rooted_dir} <= api.backend_dirs()
    assert api.keys() == {"layer", "child", "rooted"}

    # The lease goes (a deletion, not synchronous): the collector runs by itself soon after.
    api.drop_lease(lease, sync=False)
    assert wait_until(lambda: api.keys() == {"layer", "rooted"}), api.keys()
    # The gc.root snapshot stays, and keeps its parent.
    assert api.exists("rooted") and api.exists("layer")
    assert wait_until(lambda: child_dir not in api.backend_dirs())
    assert {base_dir, rooted_dir} <= api.backend_dirs()

    # Once the root is removed, the parent has nothing left keeping it.
    api.remove("rooted")
    assert wait_until(lambda: api.keys() == set()), api.keys()
    assert wait_until(lambda: not {base_dir, rooted_dir} & api.backend_dirs())


def test_a_lease_keeps_its_snapshots(api: Api) -> None:
    lease = api.lease()
    api.prepare("leased-base", lease=lease)
    api.commit("leased", "leased-base", lease=lease)
    leased_dir = snapshot_dir(api.prepare("leased-child", "leased", lease=lease))
    other = api.lease()
    api.prepare("other", lease=other)

    api.collect()
    api.drop_lease(other, sync=True)
    assert api.keys() == {"leased", "leased-child"}
    assert leased_dir in api.backend_dirs()

    api.drop_lease(lease, sync=True)
    assert wait_until(lambda: api.keys() == set()), api.keys()
    assert wait_until(lambda: leased_dir not in api.backend_dirs())


def test_a_container_record_keeps_its_snapshot(api: Api) -> None:
    lease = api.lease()
    api.prepare("img-base", lease=lease)
    api.commit("img", "img-base", lease=lease)
    rw_dir = snapshot_dir(api.prepare("ctr-rw", "img", lease=lease))
    api.create_container("gc-ctr", "ctr-rw")
    api.drop_lease(lease, sync=True)

    # The container keeps its snapshot, and the snapshot its parent.
    api.collect()
    assert api.keys() == {"img", "ctr-rw"}
    assert rw_dir in api.backend_dirs()

    # Deleting the record is a deletion: GC follows and takes both.
    api.delete_container("gc-ctr")
    assert wait_until(lambda: api.keys() == set()), api.keys()
    assert wait_until(lambda: rw_dir not in api.backend_dirs())


def test_an_image_keeps_its_chain_through_the_config_label(
    api: Api, built_images: images.Images, ctr_bin: str
) -> None:
    before = api.backend_dirs()
    api.ctr(ctr_bin, "images", "import", "--base-name", "docker.io/gc/multi", built_images.multi.oci_tar)
    chain = api.keys()
    assert len(chain) == 3
    layer_dirs = api.backend_dirs() - before
    assert len(layer_dirs) == 3

    # The config blob's label names the top of the chain; each snapshot keeps its parent.
    config = config_digest(built_images.multi)
    labels = content_labels(api, ctr_bin, config)
    assert labels[GC_REF_SNAPSHOT] in chain
    api.collect()
    assert api.keys() == chain and layer_dirs <= api.backend_dirs()

    # Without the label the image no longer reaches the snapshots.
    api.ctr(ctr_bin, "content", "label", config, f"{GC_REF_SNAPSHOT}=")
    assert GC_REF_SNAPSHOT not in content_labels(api, ctr_bin, config)
    api.collect()
    assert wait_until(lambda: api.keys() == set()), api.keys()
    assert wait_until(lambda: not layer_dirs & api.backend_dirs())

    # The image itself still holds its content until it goes too.
    assert config in api.ctr(ctr_bin, "content", "ls", "-q").split()
    api.ctr(ctr_bin, "images", "rm", "--sync", "docker.io/gc/multi:latest")
    assert wait_until(lambda: api.ctr(ctr_bin, "content", "ls", "-q") == "")


def config_digest(img: images.Image) -> str:
    with open(os.path.join(img.layout, "index.json")) as f:
        manifest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(img.layout, "blobs", *manifest.split(":"))) as f:
        return str(json.load(f)["config"]["digest"])


def content_labels(api: Api, ctr_bin: str, dgst: str) -> dict[str, str]:
    """Labels of one blob, from ``ctr content ls`` (LABELS is the last column)."""
    for line in api.ctr(ctr_bin, "content", "ls").splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] == dgst:
            return dict(kv.split("=", 1) for kv in cells[-1].split(",") if "=" in kv)
    raise AssertionError(f"{dgst} not in content ls")


def test_snapshots_survive_a_clean_restart(pyctrd: daemons.Daemon) -> None:
    api = Api(pyctrd, f"gc-{uuid.uuid4().hex[:8]}")
    api.prepare("kept-base", **{GC_ROOT: "yes"})
    api.commit("kept", "kept-base")
    child_dir = snapshot_dir(api.prepare("kept-child", "kept", **{GC_ROOT: "yes"}))

    assert pyctrd.stop() == 0
    # Every plugin closes once: the snapshot service does not close the snapshotters it uses.
    assert "failed to close plugin" not in pyctrd.log()
    daemons.restart(pyctrd)
    api.collect()
    assert api.keys() == {"kept", "kept-child"}
    assert child_dir in api.backend_dirs()
