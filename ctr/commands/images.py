"""``pyctr images pull|push|import|export|ls|check|tag|rm|inspect|mount|unmount``.

Pull, push, import and export run in the daemon (the Transfer service); import and export move
the tar over a flow-controlled side stream (see pyctr.daemon.transfer.archive for the protocol:
the receiver grants window with WindowUpdate, the sender sends Data within it). Mount and unmount
are client-side, as ctr's: a View snapshot of the image's top layer, mounted here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from pyctr.api import platforms, typeurl
from pyctr.api._pb.containerd.services.content.v1 import InfoRequest, ReadContentRequest
from pyctr.api._pb.containerd.services.images import v1 as pb
from pyctr.api._pb.containerd.services.streaming.v1 import StreamInit
from pyctr.api._pb.containerd.services.transfer.v1 import TransferOptions, TransferRequest
from pyctr.api._pb.containerd.types import Platform as PbPlatform
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import ContainerdError, InvalidArgument, NotFound
from pyctr.ctr import output
from pyctr.ctr.client import Client
from pyctr.ctr.credentials import CredentialSource

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def register(sub: Any) -> None:
    p = sub.add_parser("images", aliases=["image", "i"], help="manage images")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    pull = verbs.add_parser("pull", help="pull an image from a registry (the daemon fetches and unpacks it)")
    pull.add_argument("ref")
    pull.add_argument("--platform", action="append", default=[], help="platform(s) to pull, e.g. linux/arm64")
    pull.add_argument("--all-platforms", action="store_true")
    pull.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    pull.add_argument("--no-unpack", action="store_true")
    pull.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    pull.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    _add_user(pull)
    pull.set_defaults(func=pull_)

    ls = verbs.add_parser("ls", aliases=["list"], help="list images (filters: name==…, labels.k==…)")
    ls.add_argument("filters", nargs="*")
    ls.add_argument("-q", "--quiet", action="store_true")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=list_)

    tag = verbs.add_parser("tag", help="give an image another name")
    tag.add_argument("source")
    tag.add_argument("targets", nargs="+")
    tag.add_argument("--force", action="store_true")
    tag.set_defaults(func=tag_)

    rm = verbs.add_parser("rm", aliases=["delete", "del", "remove"], help="remove images")
    rm.add_argument("refs", nargs="+")
    rm.add_argument("--sync", action="store_true", help="wait for garbage collection")
    rm.set_defaults(func=remove)

    inspect = verbs.add_parser("inspect", help="show an image's record, manifest and config as JSON")
    inspect.add_argument("ref")
    inspect.set_defaults(func=inspect_)

    check = verbs.add_parser("check", help="check that an image's content is complete")
    check.add_argument("filters", nargs="*")
    check.set_defaults(func=check_)

    push = verbs.add_parser("push", help="push an image to a registry (plain HTTP for localhost)")
    push.add_argument("ref", help="where to push, e.g. 127.0.0.1:5000/library/busybox:latest")
    push.add_argument("local", nargs="?", default="", help="the local image (default: ref)")
    push.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    _add_user(push)
    push.set_defaults(func=push_)

    export = verbs.add_parser("export", help="write images to an OCI layout tar (docker-loadable)")
    export.add_argument("file")
    export.add_argument("refs", nargs="+")
    export.add_argument("--platform", action="append", default=[])
    export.add_argument("--all-platforms", action="store_true")
    export.add_argument("--skip-manifest-json", action="store_true")
    export.set_defaults(func=export_)

    imp = verbs.add_parser("import", help="import images from an OCI layout or docker-archive tar")
    imp.add_argument("file")
    imp.add_argument("--base-name", default="", help="name prefix for images named only by a tag")
    imp.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    imp.add_argument("--no-unpack", action="store_true")
    imp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    imp.set_defaults(func=import_)

    mount = verbs.add_parser("mount", help="mount an image's root filesystem read-only at TARGET")
    mount.add_argument("ref")
    mount.add_argument("target")
    mount.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    mount.set_defaults(func=mount_)

    unmount = verbs.add_parser("unmount", help="unmount an image mounted at TARGET")
    unmount.add_argument("target")
    unmount.add_argument("--rm", action="store_true", help="also remove the snapshot and its lease")
    unmount.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    unmount.set_defaults(func=unmount_)


def _add_user(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-u",
        "--user",
        default="",
        metavar="USER[:PASSWORD]",
        help="registry credentials (asked for on the terminal without the password); "
        "default: $DOCKER_CONFIG/config.json or ~/.docker/config.json",
    )


# -- pull ------------------------------------------------------------------------------------------

# Events shown under another name: ctr's word for content that was there already.
SHOWN_AS = {"already exists": "exists"}
# In-flight events: bars on a terminal, left out of plain output (one line per state change).
IN_FLIGHT = frozenset({"waiting", "downloading", "uploading"})


class ProgressView:
    """One line per blob, redrawn in place on a terminal; plain lines otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.rows: dict[str, str] = {}
        self.drawn = 0
        self.started = time.monotonic()

    def update(self, p: tt.Progress) -> None:
        event = SHOWN_AS.get(p.event, p.event)
        if not p.name.startswith("sha256:") or not self.tty:
            if p.event in IN_FLIGHT and not self.tty:
                return
            label = p.name[:19] if p.name.startswith("sha256:") else p.name
            print(f"{event}: {label}".rstrip(": "), flush=True)
            return
        short = p.name[7:19]
        if p.total:
            width = 30
            done = int(width * min(p.progress, p.total) / p.total)
            bar = "+" * done + " " * (width - done)
            amount = f"{output.human_size(p.progress)}/{output.human_size(p.total)}"
            self.rows[short] = f"{short}  {event:<15} |{bar}| {amount}"
        else:
            self.rows[short] = f"{short}  {event}"
        self.redraw()

    def redraw(self) -> None:
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F")
        for row in self.rows.values():
            sys.stdout.write("\x1b[2K" + row + "\n")
        self.drawn = len(self.rows)
        sys.stdout.flush()


async def pull_(args: argparse.Namespace, client: Client) -> int:
    creds = CredentialSource.from_args(args.user)  # before anything starts: it may prompt
    wanted = [platforms.parse(p) for p in args.platform]
    dest = tt.ImageStore(
        name="",
        labels=output.parse_labels(args.label),
        platforms=[PbPlatform(os=p.os, architecture=p.architecture, variant=p.variant) for p in wanted],
        all_metadata=args.all_platforms,
        unpacks=[]
        if args.no_unpack
        else [
            tt.UnpackConfiguration(
                platform=PbPlatform(os=p.os, architecture=p.architecture, variant=p.variant),
                snapshotter=args.snapshotter,
            )
            for p in (wanted or [platforms.default()])
        ],
    )
    view = ProgressView(sys.stdout.isatty() and not args.plain)
    async with RegistryTransfer(client, creds, view) as remote:
        await _transfer(client, remote.registry(args.ref), dest, remote.progress_id)
    print(f"done: {args.ref} in {time.monotonic() - view.started:.2f}s")
    return 0


# -- listing ---------------------------------------------------------------------------------------


async def read_json(client: Client, digest: str) -> Any:
    chunks = []
    async for resp in client.content.read(ReadContentRequest(digest=digest)):
        chunks.append(resp.data)
    return json.loads(b"".join(chunks))


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
            for m in index.get("manifests", []):
                p = m.get("platform") or {}
                plat = platforms.Platform(p.get("os", ""), p.get("architecture", ""), p.get("variant", ""))
                plats.append(str(platforms.normalize(plat)))
                if platforms.matches(plat, host):
                    manifest_digest = m["digest"]
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
        return 0, plats
    except Exception as exc:
        if "not found" in str(exc):
            return 0, plats
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


class RegistryTransfer:
    """The side streams of a pull or push: progress shown in ``view``, and, when there are
    credentials to offer, the auth stream on which the daemon asks for them (one AuthRequest,
    one AuthResponse; see pyctr.ctr.credentials)."""

    def __init__(self, client: Client, creds: CredentialSource, view: ProgressView) -> None:
        self.client = client
        self.creds = creds
        self.view = view
        self.progress: SideStream | None = None
        self.auth: SideStream | None = None
        self._tasks: list[asyncio.Future[None]] = []

    @property
    def progress_id(self) -> str:
        return self.progress.id if self.progress is not None else ""

    def registry(self, ref: str) -> tt.OciRegistry:
        auth_id = self.auth.id if self.auth is not None else ""
        return tt.OciRegistry(reference=ref, resolver=tt.RegistryResolver(auth_stream=auth_id))

    async def __aenter__(self) -> RegistryTransfer:
        try:
            self.progress = await SideStream(self.client, "progress").open()
            self._tasks.append(asyncio.ensure_future(self._show(self.progress)))
            if not self.creds.empty:
                self.auth = await SideStream(self.client, "auth").open()
                self._tasks.append(asyncio.ensure_future(self._answer(self.auth)))
        except BaseException:
            await self._close(wait=0)  # no transfer ran: the daemon would not close them
            raise
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and self._tasks:
            # The daemon closes its halves when the transfer ends: the last progress arrives first.
            await asyncio.wait(self._tasks, timeout=10)
        await self._close()

    async def _close(self, wait: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for side in (self.progress, self.auth):
            if side is not None:
                await side.close(wait)

    async def _show(self, side: SideStream) -> None:
        while (obj := await side.incoming.get()) is not None:
            if isinstance(obj, tt.Progress):
                self.view.update(obj)

    async def _answer(self, side: SideStream) -> None:
        while (obj := await side.incoming.get()) is not None:
            if not isinstance(obj, tt.AuthRequest):
                continue
            try:
                found = await asyncio.to_thread(self.creds.lookup, obj.host)
            except ContainerdError as e:
                # A broken entry or helper: said once, and the daemon goes on without credentials.
                print(f"pyctr: credentials for {obj.host}: {e}", file=sys.stderr)
                found = None
            if found is None:
                side.send(tt.AuthResponse(auth_type=tt.AuthType.NONE))
            elif not found.username:
                side.send(tt.AuthResponse(auth_type=tt.AuthType.REFRESH, secret=found.secret))
            else:
                side.send(
                    tt.AuthResponse(
                        auth_type=tt.AuthType.CREDENTIALS, username=found.username, secret=found.secret
                    )
                )


async def push_(args: argparse.Namespace, client: Client) -> int:
    creds = CredentialSource.from_args(args.user)  # before anything starts: it may prompt
    view = ProgressView(sys.stdout.isatty() and not args.plain)
    async with RegistryTransfer(client, creds, view) as remote:
        await _transfer(
            client, tt.ImageStore(name=args.local or args.ref), remote.registry(args.ref), remote.progress_id
        )
    print(f"pushed: {args.ref} in {time.monotonic() - view.started:.2f}s")
    return 0


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
