"""The walking differ: apply layer blobs onto mounts, and write the diff between two mounts.

Mount handling, without mounting where the layout makes it unnecessary (as containerd's
overlay-aware applier does):
* one ``overlay`` mount with ``upperdir``: apply into the upper dir with overlay whiteouts, the
  ``lowerdir`` list as parents;
* one ``bind`` mount: apply into its source with whiteouts as deletions;
* anything else: mount it on a temporary directory, apply there, unmount.
The tar work runs in a worker thread; the event loop only waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyctr.api.errdefs import FailedPrecondition, InvalidArgument, NotImplementedErr
from pyctr.api.mount import Mount
from pyctr.daemon.content.store import ContentStore

if TYPE_CHECKING:
    from pyctr.snapshotter.layer import compression

# The layer code (tarfile, isal, zstandard) is imported by the first Apply or Diff, not at start-up.

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]


@contextlib.contextmanager
def mounted(mounts: Sequence[Mount], readonly: bool = False) -> Iterator[str]:
    """Mount ``mounts`` on a fresh temporary directory for the duration of the block (blocking)."""
    target = tempfile.mkdtemp(prefix="pyctrd-mount-")
    done: list[str] = []
    try:
        for m in mounts:
            opts = list(m.options)
            if readonly and "ro" not in opts:
                opts = [o for o in opts if o != "rw"] + ["ro"]
            args = ["mount", "-t", m.type if m.type != "bind" else "none"]
            if m.type == "bind" and "bind" not in opts and "rbind" not in opts:
                opts.append("bind")
            if opts:
                args += ["-o", ",".join(opts)]
            res = subprocess.run([*args, m.source, target], capture_output=True, text=True)
            if res.returncode != 0:
                raise FailedPrecondition(f"mount {m.type} {m.source}: {res.stderr.strip()}")
            done.append(target)
        yield target
    finally:
        for t in reversed(done):
            subprocess.run(["umount", t], capture_output=True)
        os.rmdir(target)


def _single(mounts: Sequence[Mount]) -> Mount | None:
    return mounts[0] if len(mounts) == 1 else None


def apply_to_mounts(
    blob_path: str, media_type: str, mounts: Sequence[Mount], cancel: threading.Event
) -> tuple[str, int]:
    """Apply one layer blob; returns (diff_id, uncompressed size). Blocking."""
    from pyctr.snapshotter.layer import apply as layer_apply
    from pyctr.snapshotter.layer import compression

    comp = compression.compression_for_media_type(media_type)
    if comp is None and media_type and "layer" not in media_type and "diff" not in media_type:
        raise NotImplementedErr(f"unsupported media type {media_type}")
    if media_type.endswith(".tar") or media_type.endswith("tar"):
        comp = compression.Compression.NONE
    with open(blob_path, "rb") as raw:
        stream = compression.open_decompressed(raw, comp)
        m = _single(mounts)
        if m is not None and m.type == "overlay" and m.option("upperdir"):
            lowers = (m.option("lowerdir") or "").split(":") if m.option("lowerdir") else []
            upper = m.option("upperdir")
            assert upper is not None
            result = layer_apply.apply_layer(stream, upper, overlay=True, parents=lowers, cancel=cancel)
        elif m is not None and m.type == "bind":
            if "ro" in m.options:
                raise InvalidArgument("cannot apply a layer to a read-only mount")
            result = layer_apply.apply_layer(stream, m.source, overlay=False, cancel=cancel)
        elif not mounts:
            raise InvalidArgument("no mounts to apply the layer to")
        else:
            with mounted(mounts) as root:
                result = layer_apply.apply_layer(stream, root, overlay=False, cancel=cancel)
    return result.digest, result.size


def _dir_of(m: Mount) -> str | None:
    if m.type == "bind":
        return m.source
    return None


def write_diff(
    out_path: str, lower: Sequence[Mount], upper: Sequence[Mount], comp: compression.Compression
) -> tuple[str, str, int]:
    """Write the layer turning ``lower`` into ``upper`` to ``out_path``.

    Returns (compressed digest, uncompressed digest, compressed size). Blocking.
    """
    from pyctr.snapshotter.layer import compression
    from pyctr.snapshotter.layer import diff as layer_diff

    with open(out_path, "wb") as f:
        digesting = compression.DigestingWriter(f)
        with compression.Compressor(digesting, comp) as comp_writer:
            um = _single(upper)
            if um is not None and um.type == "overlay" and um.option("upperdir"):
                upperdir = um.option("upperdir")
                assert upperdir is not None
                result = layer_diff.write_overlay_diff(comp_writer, upperdir)
            else:
                with contextlib.ExitStack() as stack:
                    ldir = None
                    if lower:
                        lm = _single(lower)
                        ldir = _dir_of(lm) if lm is not None else None
                        if ldir is None:
                            ldir = stack.enter_context(mounted(lower, readonly=True))
                    udir = _dir_of(um) if um is not None else None
                    if udir is None:
                        udir = stack.enter_context(mounted(upper, readonly=True))
                    result = layer_diff.write_diff(comp_writer, ldir, udir)
        f.flush()
        os.fsync(f.fileno())
    return digesting.digest, result.digest, digesting.size


class Differ:
    def __init__(self, content: ContentStore) -> None:
        self.content = content

    async def apply(self, ns: str, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        info = await self.content.info(ns, desc.digest)
        cancel = threading.Event()
        try:
            diff_id, size = await asyncio.to_thread(
                apply_to_mounts, self.content.blob_path(desc.digest), desc.media_type, mounts, cancel
            )
        except asyncio.CancelledError:
            cancel.set()  # the worker stops at the next member; the caller removes the snapshot
            raise
        expected = info.labels.get(UNCOMPRESSED_LABEL)
        if expected and expected != diff_id:
            raise FailedPrecondition(
                f"applied layer digest {diff_id} does not match {UNCOMPRESSED_LABEL} {expected}"
            )
        return Descriptor(MEDIA_TYPE_LAYER, diff_id, size, {})

    async def diff(
        self,
        ns: str,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        media_type: str,
        labels: dict[str, str],
        lease: str,
    ) -> Descriptor:
        from pyctr.snapshotter.layer import compression

        media_type = media_type or MEDIA_TYPE_LAYER_GZIP
        comp = compression.compression_for_media_type(media_type)
        if comp is None:
            if media_type != MEDIA_TYPE_LAYER:
                raise NotImplementedErr(f"unsupported diff media type: {media_type}")
            comp = compression.Compression.NONE
        tmp = self.content.local.temp_path()
        try:
            dgst, diff_id, size = await asyncio.to_thread(write_diff, tmp, lower, upper, comp)
            lbls = dict(labels)
            lbls[UNCOMPRESSED_LABEL] = diff_id
            await self.content.commit_file(ns, tmp, dgst, size, lbls, lease)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return Descriptor(media_type, dgst, size, {})
