"""The image verbs that use the generated API (everything but pull and push): listing, tags,
inspection, checks, import and export over a flow-controlled side stream, mount and unmount.

Import and export move the tar over a Streaming side stream (see pyctr.daemon.transfer.archive for
the protocol: the receiver grants window with WindowUpdate, the sender sends Data within it).
Mount and unmount are client-side, as ctr's: a View snapshot of the image's top layer, mounted here.
``pyctr.ctr.commands.images`` registers these verbs and imports this module when one runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from pyctr.api import platforms, typeurl
from pyctr.api._pb.containerd.services.content.v1 import InfoRequest
from pyctr.api._pb.containerd.services.images import v1 as pb
from pyctr.api._pb.containerd.services.streaming.v1 import StreamInit
from pyctr.api._pb.containerd.services.transfer.v1 import TransferOptions, TransferRequest
from pyctr.api._pb.containerd.types import Platform as PbPlatform
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import ContainerdError, InvalidArgument, NotFound
from pyctr.ctr import output
from pyctr.ctr.client import Client
from pyctr.ctr.contentio import read_blob

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    *INDEX_TYPES,
)

# -- listing ---------------------------------------------------------------------------------------


async def read_json(client: Client, digest: str) -> Any:
    return json.loads(await read_blob(client, digest))


async def describe(client: Client, image: pb.Image) -> tuple[int, list[str]]:
    """Size of the default platform's content and the platforms an image offers, as ctr shows them."""
    assert image.target is not None
    target = image.target
    plats: list[str] = []
    manifest_digest = target.digest
    try:
        if target.media_type in INDEX_TYPES:
            index = await read_json(client, target.digest)
            host = platforms.default()
            chosen = []
            for m in index.get("manifests", []):
                p = m.get("platform")
                if p is None:
                    continue
                plat = platforms.Platform(p.get("os", ""), p.get("architecture", ""), p.get("variant", ""))
                plats.append(str(platforms.normalize(plat)))
                if platforms.matches(plat, host):
                    chosen.append(m)
            # As containerd's LimitManifests(…, 1): one child, a platform match before those without one.
            chosen += [m for m in index.get("manifests", []) if m.get("platform") is None]
            if chosen and chosen[0].get("mediaType") not in MANIFEST_TYPES:
                # Not an image: a checkpoint's index leads with criu's tar.
                return target.size + int(chosen[0].get("size", 0)), sorted(set(plats))
            if chosen:
                manifest_digest = chosen[0]["digest"]
        manifest = await read_json(client, manifest_digest)
        size = sum(int(d.get("size", 0)) for d in [manifest.get("config", {}), *manifest.get("layers", [])])
        info = (await client.content.info(InfoRequest(digest=manifest_digest))).info
        size += info.size if info is not None else 0
        if not plats:
            config = await read_json(client, manifest["config"]["digest"])
            plat = platforms.Platform(
                config.get("os", ""), config.get("architecture", ""), config.get("variant", "")
            )
            plats.append(str(platforms.normalize(plat)))
        return size, sorted(set(plats))
    except (ContainerdError, KeyError, ValueError):
        return 0, sorted(set(plats))
    except Exception as exc:
        if "not found" in str(exc):
            return 0, sorted(set(plats))
        raise


async def list_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.images.list(pb.ListImagesRequest(filters=args.filters))
    if args.quiet:
        for img in resp.images:
            print(img.name)
        return 0
    rows = []
    for img in resp.images:
        size, plats = await describe(client, img)
        rows.append((img, size, plats))
    if args.format == "json":
        output.print_json(
            [
                {
                    "name": img.name,
                    "target": {
                        "media_type": img.target.media_type if img.target else "",
                        "digest": img.target.digest if img.target else "",
                        "size": img.target.size if img.target else 0,
                    },
                    "size": size,
                    "platforms": plats,
                    "labels": dict(img.labels),
                    "created_at": img.created_at,
                    "updated_at": img.updated_at,
                }
                for img, size, plats in rows
            ]
        )
        return 0
    output.table(
        ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"],
        [
            [
                img.name,
                img.target.media_type if img.target else "",
                img.target.digest if img.target else "",
                output.human_size(size),
                ",".join(plats) or "-",
                output.labels(img.labels),
            ]
            for img, size, plats in rows
        ],
    )
    return 0


async def tag_(args: argparse.Namespace, client: Client) -> int:
    src = (await client.images.get(pb.GetImageRequest(name=args.source))).image
    assert src is not None
    for target in args.targets:
        new = pb.Image(name=target, labels=dict(src.labels), target=src.target)
        try:
            await client.images.create(pb.CreateImageRequest(image=new))
        except Exception:
            if not args.force:
                raise
            await client.images.delete(pb.DeleteImageRequest(name=target))
            await client.images.create(pb.CreateImageRequest(image=new))
        print(target)
    return 0


async def remove(args: argparse.Namespace, client: Client) -> int:
    for i, ref in enumerate(args.refs):
        sync = args.sync and i == len(args.refs) - 1
        await client.images.delete(pb.DeleteImageRequest(name=ref, sync=sync))
        print(ref)
    return 0


async def inspect_(args: argparse.Namespace, client: Client) -> int:
    img = (await client.images.get(pb.GetImageRequest(name=args.ref))).image
    assert img is not None and img.target is not None
    doc: dict[str, Any] = {
        "name": img.name,
        "labels": dict(img.labels),
        "target": {"media_type": img.target.media_type, "digest": img.target.digest, "size": img.target.size},
        "created_at": img.created_at,
    }
    top = await read_json(client, img.target.digest)
    if img.target.media_type in INDEX_TYPES:
        doc["index"] = top
        host = platforms.default()
        for m in top.get("manifests", []):
            p = m.get("platform") or {}
            if platforms.matches(
                platforms.Platform(p.get("os", ""), p.get("architecture", ""), p.get("variant", "")), host
            ):
                top = await read_json(client, m["digest"])
                break
    doc["manifest"] = top
    if "config" in top:
        doc["config"] = await read_json(client, top["config"]["digest"])
    output.print_json(doc)
    return 0


async def check_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.images.list(pb.ListImagesRequest(filters=args.filters))
    rows = []
    status = 0
    for img in resp.images:
        assert img.target is not None
        missing = 0
        try:
            top = await read_json(client, img.target.digest)
            manifests = [img.target.digest]
            if img.target.media_type in INDEX_TYPES:
                manifests = [m["digest"] for m in top.get("manifests", [])]
            present = total = 0
            for md in manifests:
                try:
                    m = await read_json(client, md)
                except Exception:
                    continue
                for d in [m.get("config", {}), *m.get("layers", [])]:
                    total += 1
                    try:
                        await client.content.info(InfoRequest(digest=d["digest"]))
                        present += 1
                    except Exception:
                        missing += 1
            state = f"complete ({present}/{total})" if not missing else f"incomplete ({present}/{total})"
        except (NotFound, Exception):
            state = "missing"
            missing = 1
        if missing:
            status = 1
        rows.append([img.name, state])
    output.table(["REF", "STATUS"], rows)
    return status


async def image_config(client: Client, name: str) -> tuple[dict[str, Any], list[str]]:
    """The image's config for this host's platform and the chain IDs of its layers."""
    import hashlib

    img = (await client.images.get(pb.GetImageRequest(name=name))).image
    assert img is not None and img.target is not None
    top = await read_json(client, img.target.digest)
    if img.target.media_type in INDEX_TYPES:
        host = platforms.default()
        for m in top.get("manifests", []):
            p = m.get("platform") or {}
            plat = platforms.Platform(p.get("os", ""), p.get("architecture", ""), p.get("variant", ""))
            if platforms.matches(plat, host):
                top = await read_json(client, m["digest"])
                break
        else:
            raise NotFound(f"image {name}: no manifest for platform {host}")
    config = await read_json(client, top["config"]["digest"])
    chains: list[str] = []
    for diff_id in config.get("rootfs", {}).get("diff_ids", []):
        if chains:
            diff_id = "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        chains.append(diff_id)
    return config, chains


# -- side streams, push, import, export ----------------------------------------------------------

MAX_READ = 32 * 1024  # containerd's Data size and window: pyctr.daemon.transfer.archive
WINDOW = 2 * MAX_READ


class SideStream:
    """Our end of a Streaming.Stream: ``send`` Anys, read decoded messages from ``incoming``.

    The daemon ends its half when the transfer that uses the stream ends (and grpc then closes
    the whole stream): only the import's data stream is ever half-closed by us, to mark the end
    of the archive. Otherwise our half is stopped, not ended: ending a stream the daemon has
    already closed is an error in grpclib's sending task."""

    def __init__(self, client: Client, prefix: str) -> None:
        self.client = client
        self.id = f"{prefix}-{os.getpid()}-{time.time_ns()}"
        self._out: asyncio.Queue[PbAny | None] = asyncio.Queue()
        self.incoming: asyncio.Queue[object | None] = asyncio.Queue()  # None: the daemon closed it
        self._acked = asyncio.Event()
        self._reader: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[Any] | None = None  # grpclib's task that sends our half

    async def _requests(self) -> AsyncIterator[PbAny]:
        self._sender = asyncio.current_task()
        url, value = typeurl.marshal(StreamInit(id=self.id))
        yield PbAny(type_url=url, value=value)
        while (msg := await self._out.get()) is not None:
            yield msg

    async def open(self) -> SideStream:
        responses = self.client.streaming.stream(self._requests())

        async def read() -> None:
            try:
                async for msg in responses:
                    if not self._acked.is_set():
                        self._acked.set()  # the first message acknowledges the registration
                        continue
                    try:
                        self.incoming.put_nowait(typeurl.unmarshal(msg.type_url, msg.value))
                    except KeyError:
                        continue  # unknown message types are ignored, as containerd does
            finally:
                self.incoming.put_nowait(None)
                self._acked.set()

        self._reader = asyncio.ensure_future(read())
        await asyncio.wait_for(asyncio.shield(self._acked.wait()), 10)
        if self._reader.done():
            self._reader.result()  # the daemon refused the stream: raise its error
            raise ContainerdError(f"stream {self.id} closed before it was acknowledged")
        return self

    def send(self, message: Any) -> None:
        url, value = typeurl.marshal(message)
        self._out.put_nowait(PbAny(type_url=url, value=value))

    def end(self) -> None:
        """End our half (EOF for the daemon), unless the daemon has closed the stream already."""
        if self._reader is not None and self._reader.done():
            self._stop_sending()
        else:
            self._out.put_nowait(None)

    def _stop_sending(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()

    async def close(self, wait: float = 5.0) -> None:
        """Stop both halves, once the daemon has closed its own (for at most ``wait`` seconds:
        it does when the transfer that uses the stream ends; cutting it short before then
        resets a stream the daemon is still finishing)."""
        if wait and self._reader is not None and not self._reader.done():
            await asyncio.wait([self._reader], timeout=wait)
        self._stop_sending()
        tasks = [t for t in (self._reader, self._sender) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _any(message: Any) -> PbAny:
    url, value = typeurl.marshal(message)
    return PbAny(type_url=url, value=value)


async def _transfer(client: Client, source: Any, destination: Any, progress_id: str = "") -> None:
    await client.transfer.transfer(
        TransferRequest(
            source=_any(source),
            destination=_any(destination),
            options=TransferOptions(progress_stream=progress_id),
        )
    )


async def export_(args: argparse.Namespace, client: Client) -> int:
    data = await SideStream(client, "export").open()
    received = 0

    async def receive(f: Any) -> None:
        # The receiving half of the protocol: keep at least WINDOW granted, write what arrives.
        nonlocal received
        window = 0
        while True:
            if window < WINDOW:
                data.send(tt.WindowUpdate(update=WINDOW))
                window += WINDOW
            obj = await data.incoming.get()
            if obj is None:
                return
            if isinstance(obj, tt.Data):
                f.write(obj.data)
                window -= len(obj.data)
                received += len(obj.data)

    wanted = [platforms.parse(p) for p in args.platform]
    tmp = f"{args.file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # noqa: ASYNC230 - the CLI has nothing else to run meanwhile
            receiver = asyncio.ensure_future(receive(f))
            try:
                await _transfer(
                    client,
                    tt.ImageStore(
                        name=args.refs[0], extra_references=[tt.ImageReference(name=r) for r in args.refs[1:]]
                    ),
                    tt.ImageExportStream(
                        stream=data.id,
                        media_type="application/x-tar",
                        platforms=[
                            PbPlatform(os=p.os, architecture=p.architecture, variant=p.variant)
                            for p in wanted
                        ],
                        all_platforms=args.all_platforms,
                        skip_compatibility_manifest=args.skip_manifest_json,
                    ),
                )
                await asyncio.wait_for(receiver, 30)  # the daemon closed the stream after the tar
            finally:
                receiver.cancel()
                await data.close()
        os.replace(tmp, args.file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    print(f"exported {', '.join(args.refs)} to {args.file} ({output.human_size(received)})")
    return 0


async def import_(args: argparse.Namespace, client: Client) -> int:
    data = await SideStream(client, "import").open()
    with open(args.file, "rb") as f:  # noqa: ASYNC230 - opened first, so a missing file fails cleanly

        async def send() -> None:
            # The sending half: Data within the window the daemon grants, then end our half.
            window = 0
            while True:
                while window <= 0:
                    obj = await data.incoming.get()
                    if obj is None:
                        return  # the daemon ended the transfer (it failed or needs no more)
                    if isinstance(obj, tt.WindowUpdate):
                        window += obj.update
                chunk = f.read(min(MAX_READ, window))
                if not chunk:
                    data.end()
                    return
                data.send(tt.Data(data=chunk))
                window -= len(chunk)

        sender = asyncio.ensure_future(send())
        unpacks = (
            []
            if args.no_unpack
            else [
                tt.UnpackConfiguration(
                    platform=PbPlatform(
                        os=platforms.default().os,
                        architecture=platforms.default().architecture,
                        variant=platforms.default().variant,
                    ),
                    snapshotter=args.snapshotter,
                )
            ]
        )
        started = time.monotonic()
        try:
            await _transfer(
                client,
                tt.ImageImportStream(stream=data.id, media_type="application/x-tar"),
                tt.ImageStore(
                    labels=output.parse_labels(args.label),
                    extra_references=[tt.ImageReference(name=args.base_name, is_prefix=True)]
                    if args.base_name
                    else [],
                    unpacks=unpacks,
                ),
            )
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            await data.close()
    print(f"imported {args.file} in {time.monotonic() - started:.2f}s")
    return 0


# -- mount -----------------------------------------------------------------------------------------


async def mount_(args: argparse.Namespace, client: Client) -> int:
    """A View of the image's top snapshot, kept by a lease named after the target, mounted there."""
    from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest as LeaseCreate
    from pyctr.api._pb.containerd.services.snapshots import v1 as spb

    _, chains = await image_config(client, args.ref)
    if not chains:
        raise InvalidArgument(f"image {args.ref} has no layers")
    target = os.path.abspath(args.target)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 24 * 3600))
    await client.leases.create(
        LeaseCreate(id=_mount_lease(target), labels={"containerd.io/gc.expire": expiry})
    )
    md = {"containerd-namespace": args.namespace, "containerd-lease": _mount_lease(target)}
    resp = await client.snapshots.view(
        spb.ViewSnapshotRequest(snapshotter=args.snapshotter, key=target, parent=chains[-1]), metadata=md
    )
    for m in resp.mounts:
        options = list(m.options)
        if m.type == "overlay" and "ro" not in options:
            options.append("ro")  # a lone lowerdir overlay is read-only anyway; say so, as ctr does
        cmd = ["mount", "-t", m.type, m.source, target] + (["-o", ",".join(options)] if options else [])
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise ContainerdError(f"mount {target}: {err.decode(errors='replace').strip()}")
    print(target)
    return 0


def _mount_lease(target: str) -> str:
    # Lease IDs are identifiers: derive one from the path (which may hold '/').
    import hashlib

    return "pyctr-mount-" + hashlib.sha256(target.encode()).hexdigest()[:16]


async def unmount_(args: argparse.Namespace, client: Client) -> int:
    from pyctr.api._pb.containerd.services.leases.v1 import DeleteRequest as LeaseDelete
    from pyctr.api._pb.containerd.services.snapshots import v1 as spb

    target = os.path.abspath(args.target)
    proc = await asyncio.create_subprocess_exec("umount", target, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0 and b"not mounted" not in err:
        raise ContainerdError(f"unmount {target}: {err.decode(errors='replace').strip()}")
    if args.rm:
        # The view first: deleting the lease lets the collector take it, and then Remove fails.
        with contextlib.suppress(NotFound):
            await client.snapshots.remove(spb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=target))
        with contextlib.suppress(NotFound):
            await client.leases.delete(LeaseDelete(id=_mount_lease(target)))
    print(target)
    return 0
