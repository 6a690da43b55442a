"""Checkpoint images in the content store: what Tasks.Checkpoint writes and Tasks.Create restores.

A checkpoint is criu's image directory (``runc checkpoint``, in the shim) as one uncompressed tar
blob, plus the container's spec (the protobuf Any, as stored) as a second blob; both go into the
namespace's content under the request's lease, and the client builds its image index around them
(containerd's own media types, so a Go client reads ours and ours reads containerd's). Restoring
unpacks the tar into the task's bundle before the shim is asked to create the task from it.

The tar is written and read by the layer code (``pyctr.snapshotter.layer``): the same walk as a
diff against nothing, and the same guarded apply, so a crafted checkpoint cannot write outside the
directory it is unpacked into.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyctr.api._pb.containerd.types import Descriptor
from pyctr.api.errdefs import InvalidArgument

if TYPE_CHECKING:
    from pyctr.api._pb.google.protobuf import Any as PbAny
    from pyctr.daemon.content.store import ContentStore

MEDIA_TYPE_CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_TYPE_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"

RUNC_CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"
RUNC_OPTIONS = "containerd.runc.v1.Options"


def is_runc(runtime: str) -> bool:
    """containerd's test for the runc shims' options: ``io.containerd.runc.*`` (our shim answers
    to that name too)."""
    return runtime == "io.containerd.runc" or runtime.startswith("io.containerd.runc.")


def image_path(runtime: str, options: PbAny | None) -> str:
    """Where the client wants criu's images written instead of the content store (``ctr tasks
    checkpoint --image-path``): the runc CheckpointOptions' ``image_path``, else ""."""
    if options is None or not options.type_url or not is_runc(runtime):
        return ""
    from pyctr.api._pb.containerd.runc.v1 import CheckpointOptions

    if options.type_url.removeprefix("types.containerd.io/") != RUNC_CHECKPOINT_OPTIONS:
        raise InvalidArgument(f"invalid task checkpoint option for {runtime}: {options.type_url}")
    return CheckpointOptions.parse(options.value).image_path


def restore_path(runtime: str, options: PbAny | None) -> str:
    """An image directory the client already has on this host (runc Options' ``criu_image_path``),
    restored from in place; else ""."""
    if options is None or not options.type_url or not is_runc(runtime):
        return ""
    from pyctr.api._pb.containerd.runc.v1 import Options

    if options.type_url.removeprefix("types.containerd.io/") != RUNC_OPTIONS:
        raise InvalidArgument(f"invalid task create option for {runtime}: {options.type_url}")
    return Options.parse(options.value).criu_image_path


def _descriptor(media_type: str, digest: str, size: int) -> Descriptor:
    return Descriptor(media_type=media_type, digest=digest, size=size, annotations={})


def _write_tar(out_path: str, directory: str) -> tuple[str, int]:
    from pyctr.snapshotter.layer import compression
    from pyctr.snapshotter.layer import diff as layer_diff

    with open(out_path, "wb") as f:
        digesting = compression.DigestingWriter(f)
        layer_diff.write_diff(digesting, None, directory)
        f.flush()
        os.fsync(f.fileno())
    return digesting.digest, digesting.size


def _write_bytes(out_path: str, data: bytes) -> tuple[str, int]:
    import hashlib

    with open(out_path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return f"sha256:{hashlib.sha256(data).hexdigest()}", len(data)


async def _commit(
    content: ContentStore,
    ns: str,
    lease: str,
    media_type: str,
    write: Callable[[str, Any], tuple[str, int]],
    source: Any,
) -> Descriptor:
    tmp = content.local.temp_path()
    try:
        digest, size = await asyncio.to_thread(write, tmp, source)
        await content.commit_file(ns, tmp, digest, size, {}, lease)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _descriptor(media_type, digest, size)


async def store_image(content: ContentStore, ns: str, lease: str, directory: str) -> Descriptor:
    """criu's image ``directory`` as a tar blob in ``ns``'s content."""
    return await _commit(content, ns, lease, MEDIA_TYPE_CHECKPOINT, _write_tar, directory)


async def store_spec(content: ContentStore, ns: str, lease: str, spec: PbAny) -> Descriptor:
    """The container's spec, as the Any message it is stored as."""
    return await _commit(content, ns, lease, MEDIA_TYPE_CHECKPOINT_CONFIG, _write_bytes, bytes(spec))


def _unpack(blob: str, directory: str) -> None:
    from pyctr.snapshotter.layer import apply as layer_apply

    with open(blob, "rb") as f:
        layer_apply.apply_layer(f, directory, overlay=False)


async def unpack(content: ContentStore, ns: str, checkpoint: Descriptor, directory: str) -> None:
    """Unpacks the checkpoint blob ``checkpoint`` (visible in ``ns``) into ``directory``."""
    if checkpoint.media_type != MEDIA_TYPE_CHECKPOINT:
        raise InvalidArgument(f"unsupported checkpoint type {checkpoint.media_type!r}")
    info = await content.info(ns, checkpoint.digest)  # NotFound for another namespace's blob
    if checkpoint.size and checkpoint.size != info.size:
        raise InvalidArgument(
            f"checkpoint {checkpoint.digest}: size {checkpoint.size} does not match the content's {info.size}"
        )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    await asyncio.to_thread(_unpack, content.blob_path(checkpoint.digest), directory)
