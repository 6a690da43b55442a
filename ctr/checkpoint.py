"""Checkpoint images, as containerd's Go client makes and reads them.

``pyctr tasks checkpoint`` is ``ctr tasks checkpoint``: under a lease, the task is paused, the
daemon checkpoints it into two blobs (criu's images as a tar, the container's spec), and an OCI
index ties them to the container's image and a diff of its read-write layer; the index becomes an
image named ``containerd.io/checkpoint/<id>:<date>`` labelled ``containerd.io/checkpoint=true``.
The task is resumed at the end (unless it was asked to exit). ``pyctr tasks start --checkpoint``
finds the criu tar in such an image and creates the task from it; ``pyctr containers restore``
first makes the container again (containerd's ``Restore``: ctr 1.6's own cannot restore, its
``containers checkpoint --task`` drops the task's blobs).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from typing import Any

from pyctr.api import platforms
from pyctr.api._pb.containerd.services.tasks import v1 as tpb
from pyctr.api._pb.containerd.types import Descriptor
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import ContainerdError, InvalidArgument, NotFound
from pyctr.ctr.client import Client, rpc
from pyctr.ctr.contentio import read_blob, write_blob

MEDIA_TYPE_CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
MEDIA_TYPE_RUNTIME_OPTIONS = "application/vnd.containerd.container.checkpoint.runtime.options+proto"
DEFAULT_RUNTIME = "io.containerd.runc.v2"
DEFAULT_SNAPSHOTTER = "overlayfs"
CHECKPOINT_LABEL = "containerd.io/checkpoint"


def default_name(container_id: str, now: float | None = None) -> str:
    """containerd's default checkpoint image name (local time, month first)."""
    stamp = time.strftime("%m-%d-%Y-%H:%M:%S", time.localtime(now))
    return f"containerd.io/checkpoint/{container_id}:{stamp}"


def checkpoint_options(exit: bool, image_path: str, work_path: str) -> PbAny:
    from pyctr.api._pb.containerd.runc.v1 import CheckpointOptions

    opts = CheckpointOptions(exit=exit, image_path=image_path, work_path=work_path)
    return PbAny(type_url="containerd.runc.v1.CheckpointOptions", value=bytes(opts))


def _descriptor_json(d: Descriptor, platform: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.annotations:
        out["annotations"] = dict(d.annotations)
    if platform:
        out["platform"] = platform
    return out


def _platform() -> dict[str, str]:
    p = platforms.default()
    out = {"architecture": p.architecture, "os": p.os}
    if p.variant:
        out["variant"] = p.variant
    return out


async def _rw_diff(client: Client, snapshotter: str, key: str) -> Descriptor:
    """The container's read-write layer as a gzip layer blob (containerd's ``rootfs.CreateDiff``)."""
    from pyctr.api._pb.containerd.services.diff.v1 import DiffRequest
    from pyctr.api._pb.containerd.services.snapshots import v1 as spb

    info = (
        await rpc(client, client.snapshots.stat(spb.StatSnapshotRequest(snapshotter=snapshotter, key=key)))
    ).info
    assert info is not None
    view = f"{info.parent}-parent-view-{uuid.uuid4().hex[:8]}"
    lower = (
        await rpc(
            client,
            client.snapshots.view(
                spb.ViewSnapshotRequest(snapshotter=snapshotter, key=view, parent=info.parent)
            ),
        )
    ).mounts
    try:
        upper = (
            await rpc(client, client.snapshots.mounts(spb.MountsRequest(snapshotter=snapshotter, key=key)))
        ).mounts
        diff = (
            await rpc(
                client,
                client.diff.diff(
                    DiffRequest(
                        left=lower, right=upper, media_type=MEDIA_TYPE_LAYER_GZIP, ref=f"checkpoint-rw-{key}"
                    )
                ),
            )
        ).diff
        assert diff is not None
        return diff
    finally:
        with contextlib.suppress(ContainerdError):
            await rpc(
                client, client.snapshots.remove(spb.RemoveSnapshotRequest(snapshotter=snapshotter, key=view))
            )


async def checkpoint_task(
    client: Client,
    container_id: str,
    *,
    exit: bool = False,
    image_path: str = "",
    work_path: str = "",
    name: str = "",
) -> str:
    """Checkpoints the task; returns the checkpoint image's name ("" with ``image_path``: criu's
    images are then left in that directory, and no image is made)."""
    from pyctr.api._pb.containerd.services.containers.v1 import GetContainerRequest
    from pyctr.api._pb.containerd.services.images.v1 import CreateImageRequest, GetImageRequest, Image
    from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest, DeleteRequest

    container = (await rpc(client, client.containers.get(GetContainerRequest(id=container_id)))).container
    assert container is not None
    runtime = container.runtime.name if container.runtime else ""
    options = None
    if runtime.startswith("io.containerd.runc."):
        options = checkpoint_options(exit, os.path.abspath(image_path) if image_path else "", work_path)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 24 * 3600))
    lease = f"pyctr-checkpoint-{uuid.uuid4().hex}"
    await rpc(
        client, client.leases.create(CreateRequest(id=lease, labels={"containerd.io/gc.expire": expiry}))
    )
    client.lease = lease
    try:
        # Paused first, so criu and the rw diff see one moment of the container.
        await rpc(client, client.tasks.pause(tpb.PauseTaskRequest(container_id=container_id)))
        try:
            resp = await rpc(
                client,
                client.tasks.checkpoint(
                    tpb.CheckpointTaskRequest(container_id=container_id, options=options)
                ),
            )
            if image_path:
                return ""
            platform = _platform()
            manifests = [_descriptor_json(d, platform) for d in resp.descriptors]
            annotations: dict[str, str] = {}
            if container.image:
                image = (await rpc(client, client.images.get(GetImageRequest(name=container.image)))).image
                assert image is not None and image.target is not None
                manifests.append(_descriptor_json(image.target))
                annotations["image.name"] = container.image
            if container.snapshot_key:
                manifests.append(
                    _descriptor_json(
                        await _rw_diff(client, container.snapshotter, container.snapshot_key), platform
                    )
                )
            index = {"schemaVersion": 2, "manifests": manifests, "annotations": annotations}
            data = (json.dumps(index, separators=(",", ":")) + "\n").encode()
            labels = {f"containerd.io/gc.ref.content.{i}": m["digest"] for i, m in enumerate(manifests)}
            digest = await write_blob(client, f"checkpoint-index-{container_id}", data, labels)
            name = name or default_name(container_id)
            await rpc(
                client,
                client.images.create(
                    CreateImageRequest(
                        image=Image(
                            name=name,
                            labels={CHECKPOINT_LABEL: "true"},
                            target=Descriptor(media_type=MEDIA_TYPE_INDEX, digest=digest, size=len(data)),
                        )
                    ),
                ),
            )
            return name
        finally:
            with contextlib.suppress(ContainerdError):  # gone with --exit, as with ctr
                await rpc(client, client.tasks.resume(tpb.ResumeTaskRequest(container_id=container_id)))
    finally:
        client.lease = ""
        with contextlib.suppress(ContainerdError):
            await rpc(client, client.leases.delete(DeleteRequest(id=lease)))


async def find_checkpoint(client: Client, ref: str) -> Descriptor:
    """The criu tar of checkpoint image ``ref`` (containerd's ``WithTaskCheckpoint``)."""
    from pyctr.api._pb.containerd.services.images.v1 import GetImageRequest
    from pyctr.ctr.imageops import read_json

    image = (await rpc(client, client.images.get(GetImageRequest(name=ref)))).image
    assert image is not None and image.target is not None
    if image.target.media_type != MEDIA_TYPE_INDEX:
        raise InvalidArgument(f"image {ref} is not a checkpoint: its target is {image.target.media_type}")
    index = await read_json(client, image.target.digest)
    for m in index.get("manifests") or []:
        if m.get("mediaType") == MEDIA_TYPE_CHECKPOINT:
            return Descriptor(
                media_type=m["mediaType"],
                digest=m["digest"],
                size=int(m.get("size", 0)),
                annotations=dict(m.get("annotations") or {}),
            )
    raise NotFound(f"checkpoint not found in index {image.target.digest}")


async def restore_container(client: Client, container_id: str, ref: str, *, rw: bool) -> None:
    """Creates container ``container_id`` as checkpoint image ``ref`` recorded it (containerd's
    ``Restore`` with ``WithRestoreImage``/``Spec``/``Runtime``, and ``WithRestoreRW`` for ``rw``):
    a new snapshot of the image, the read-write layer applied on it, the spec and runtime of the
    checkpointed container. Reads both index layouts: the container checkpoint's annotations, and
    the task checkpoint's ``image.name`` (``ctr tasks checkpoint``, ``pyctr tasks checkpoint``)."""
    from pyctr.api._pb.containerd.services.containers import v1 as cpb
    from pyctr.api._pb.containerd.services.diff.v1 import ApplyRequest
    from pyctr.api._pb.containerd.services.images.v1 import GetImageRequest
    from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest, DeleteRequest
    from pyctr.api._pb.containerd.services.snapshots import v1 as spb
    from pyctr.ctr.imageops import image_config, read_json

    image = (await rpc(client, client.images.get(GetImageRequest(name=ref)))).image
    assert image is not None and image.target is not None
    if image.target.media_type != MEDIA_TYPE_INDEX:
        raise InvalidArgument(f"image {ref} is not a checkpoint: its target is {image.target.media_type}")
    index = await read_json(client, image.target.digest)
    annotations = index.get("annotations") or {}
    by_type = {m.get("mediaType"): m for m in index.get("manifests") or []}
    name = annotations.get("org.opencontainers.image.ref.name") or annotations.get("image.name")
    if not name:
        raise InvalidArgument(f"checkpoint {ref} names no image")
    if MEDIA_TYPE_CHECKPOINT_CONFIG not in by_type:
        raise NotFound(f"checkpoint {ref} has no spec ({MEDIA_TYPE_CHECKPOINT_CONFIG})")
    spec = PbAny.parse(await rpc(client, read_blob(client, by_type[MEDIA_TYPE_CHECKPOINT_CONFIG]["digest"])))
    options = None
    if MEDIA_TYPE_RUNTIME_OPTIONS in by_type:
        options = PbAny.parse(
            await rpc(client, read_blob(client, by_type[MEDIA_TYPE_RUNTIME_OPTIONS]["digest"]))
        )
    runtime = annotations.get("io.containerd.checkpoint.runtime") or DEFAULT_RUNTIME
    if options is None and runtime.startswith("io.containerd.runc."):
        options = PbAny(type_url="containerd.runc.v1.Options")  # what ctr run records, all defaults
    snapshotter = annotations.get("io.containerd.checkpoint.snapshotter") or DEFAULT_SNAPSHOTTER
    if rw and MEDIA_TYPE_LAYER_GZIP not in by_type:
        raise NotFound(f"checkpoint {ref} has no read-write layer")
    _, chains = await image_config(client, name)
    if not chains:
        raise InvalidArgument(f"image {name} has no layers")

    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    lease = f"pyctr-restore-{uuid.uuid4().hex}"
    await rpc(
        client, client.leases.create(CreateRequest(id=lease, labels={"containerd.io/gc.expire": expiry}))
    )
    client.lease = lease
    prepared = False
    try:
        mounts = (
            await rpc(
                client,
                client.snapshots.prepare(
                    spb.PrepareSnapshotRequest(snapshotter=snapshotter, key=container_id, parent=chains[-1])
                ),
            )
        ).mounts
        prepared = True
        if rw:
            layer = by_type[MEDIA_TYPE_LAYER_GZIP]
            desc = Descriptor(media_type=layer["mediaType"], digest=layer["digest"], size=int(layer["size"]))
            await rpc(client, client.diff.apply(ApplyRequest(diff=desc, mounts=list(mounts))))
        container = cpb.Container(
            id=container_id,
            image=name,
            runtime=cpb.ContainerRuntime(name=runtime, options=options),
            spec=spec,
            snapshotter=snapshotter,
            snapshot_key=container_id,
        )
        await rpc(client, client.containers.create(cpb.CreateContainerRequest(container=container)))
    except BaseException:
        if prepared:  # ours; a snapshot that existed before (the id in use) is not
            with contextlib.suppress(ContainerdError):
                await rpc(
                    client,
                    client.snapshots.remove(
                        spb.RemoveSnapshotRequest(snapshotter=snapshotter, key=container_id)
                    ),
                )
        raise
    finally:
        client.lease = ""
        with contextlib.suppress(ContainerdError):
            await rpc(client, client.leases.delete(DeleteRequest(id=lease)))
