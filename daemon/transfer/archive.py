"""Image archives: export images as a tar down a side stream, import a tar read from one.

Stream protocol (containerd's pkg/transfer/streaming, on a ``Streaming.Stream`` side stream)::

    receiver -> sender   containerd.types.transfer.WindowUpdate{update}   grant ``update`` more bytes
    sender -> receiver   containerd.types.transfer.Data{data}             at most 32 KiB, within the window
    sender               ends its half of the stream after the last Data (EOF = end of the tar)

The receiver grants ``WINDOW`` (64 KiB) up front and again whenever less than that is
outstanding, so at most 128 KiB are ever in flight; the sender never sends beyond what it was
granted. On export the daemon is the sender (the client grants); on import the daemon is the
receiver and the client's end of the stream marks the end of the archive. Unknown messages are
ignored by both sides, as containerd does.

Export writes an OCI image layout tar, as containerd's images/archive exporter does::

    blobs/sha256/<hex>   every index and the plain blobs it names (a checkpoint's), the manifests of the
                         chosen platforms, configs, layers
    oci-layout           {"imageLayoutVersion": "1.0.0"}
    index.json           one entry per image: its target, annotated io.containerd.image.name
                         (the full name) and org.opencontainers.image.ref.name (the tag)
    manifest.json        docker-load compatibility: [{Config, RepoTags, Layers}] per manifest

Import accepts that layout and docker-archive tars (``manifest.json`` naming a config and layer
tars); for the latter it writes a Docker schema 2 manifest. Blobs get the gc.ref labels a pull
gives them, everything is written under a lease, and images are named from
``io.containerd.image.name``, ``org.opencontainers.image.ref.name`` (prefixed with the base
name) or the docker ``RepoTags``.

A failed import (a truncated or damaged tar, JSON that is not, a blob whose bytes do not match
its name, a layer that does not unpack) records no image: images are stored only once every blob
is in and every layer unpacked, and what was written before the failure is held by the import's
lease alone, so the collector takes it once the lease is gone. A tar must end with its
end-of-archive (zero) blocks: one that stops at a member boundary was cut short.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import os
import tarfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pyctr.api import errdefs, platforms, typeurl
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.diff.differ import Descriptor as DiffDescriptor
from pyctr.daemon.diff.differ import Differ
from pyctr.daemon.events import Exchange
from pyctr.daemon.metadata import images as imagestore
from pyctr.daemon.metadata import leases as leasestore
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.snapshots.store import SnapshotStore
from pyctr.daemon.transfer import unpack
from pyctr.daemon.transfer.streams import SideStream

MAX_READ = 32 * 1024
WINDOW = 2 * MAX_READ
JSON_LIMIT = 16 << 20  # index.json / manifest.json are held in memory: refuse absurd ones

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

ProgressFunc = Callable[[str, str, int, int], None]  # event, name, progress, total


def _no_progress(event: str, name: str, progress: int, total: int) -> None:
    pass


# -- flow-controlled data over a side stream --------------------------------------------------------


class DataSender:
    """The sending half: Data messages within the window the receiver grants."""

    def __init__(self, side: SideStream) -> None:
        self.side = side
        self.window = 0
        self._granted = asyncio.Event()
        self._ended = False
        self._reader = asyncio.ensure_future(self._read_updates())

    async def _read_updates(self) -> None:
        while (msg := await self.side.incoming.get()) is not None:
            try:
                obj = typeurl.unmarshal(msg.type_url, msg.value)
            except KeyError:
                continue
            if isinstance(obj, tt.WindowUpdate) and obj.update > 0:
                self.window += obj.update
                self._granted.set()
        self._ended = True
        self._granted.set()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self.window <= 0:
                if self._ended:
                    raise errdefs.Canceled(f"stream {self.side.id}: the receiver went away")
                self._granted.clear()
                await self._granted.wait()
            n = min(len(view), MAX_READ, self.window)
            self.side.send(tt.Data(data=bytes(view[:n])))
            self.window -= n
            view = view[n:]

    async def aclose(self) -> None:
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass


async def receive_data(side: SideStream) -> AsyncIterator[bytes]:
    """The receiving half: grant window, yield Data payloads until the sender ends its half."""
    window = 0
    while True:
        if window < WINDOW:
            side.send(tt.WindowUpdate(update=WINDOW))
            window += WINDOW
        msg = await side.incoming.get()
        if msg is None:
            return
        try:
            obj = typeurl.unmarshal(msg.type_url, msg.value)
        except KeyError:
            continue
        if isinstance(obj, tt.Data):
            window -= len(obj.data)
            if obj.data:
                yield obj.data


class ByteReader:
    """Exact reads over an async iterator of chunks (the tar parser needs 512-byte headers)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = bytearray()
        self._eof = False
        self.consumed = 0  # bytes handed out so far

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._eof:
            try:
                self._buf += await anext(self._chunks)
            except StopAsyncIteration:
                self._eof = True

    async def read_exact(self, n: int) -> bytes:
        await self._fill(n)
        if len(self._buf) < n:
            raise errdefs.InvalidArgument("archive is truncated")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.consumed += n
        return out

    async def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one unless at EOF)."""
        await self._fill(1)
        if not self._buf:
            raise errdefs.InvalidArgument("archive is truncated")
        out = bytes(self._buf[:limit])
        del self._buf[: len(out)]
        self.consumed += len(out)
        return out

    async def at_eof(self) -> bool:
        await self._fill(1)
        return not self._buf


# -- tar, sans I/O -------------------------------------------------------------------------------


def tar_header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o444
    info.mtime = 0  # reproducible archives: the same image exports to the same bytes
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


TAR_END = b"\0" * (2 * tarfile.BLOCKSIZE)


@dataclass
class _Member:
    name: str
    size: int
    regular: bool


async def _next_member(r: ByteReader) -> _Member | None:
    """The next member's header, following PAX and GNU long-name records; None at the end."""
    long_name = ""
    while True:
        if await r.at_eof():
            # Every tar writer ends with zero blocks: a stream that stops at a member boundary
            # without them was cut short, and what it lacks may be what names the images.
            if not r.consumed:
                raise errdefs.InvalidArgument("archive is empty")
            raise errdefs.InvalidArgument("archive is truncated: it ends without the end-of-archive blocks")
        block = await r.read_exact(tarfile.BLOCKSIZE)
        if block.count(0) == tarfile.BLOCKSIZE:
            return None  # the first of the two end blocks
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise errdefs.InvalidArgument(f"archive is not a tar: {e}") from None
        padded = info.size + (-info.size % tarfile.BLOCKSIZE)
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
            if info.size > JSON_LIMIT:
                raise errdefs.InvalidArgument("archive header record too large")
            payload = (await r.read_exact(padded))[: info.size]
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                # PAX records: "<len> key=value\n"; only the path matters here.
                for rec in payload.split(b"\n"):
                    _, _, kv = rec.partition(b" ")
                    key, _, value = kv.partition(b"=")
                    if key == b"path":
                        long_name = value.decode("utf-8", "surrogateescape")
            continue
        name = long_name or info.name
        return _Member(os.path.normpath(name).lstrip("/"), info.size, info.isreg())


async def _skip(r: ByteReader, n: int) -> None:
    while n > 0:
        n -= len(await r.read_some(min(n, 1 << 20)))


def _json(what: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"archive {what}: not JSON: {e}") from None


# -- export -----------------------------------------------------------------------------------------


@dataclass
class ExportOptions:
    platforms: list[platforms.Platform] = field(default_factory=list)
    all_platforms: bool = False
    skip_docker_manifest: bool = False


def _platform_of(d: dict[str, Any]) -> platforms.Platform | None:
    p = d.get("platform")
    if not p:
        return None
    return platforms.Platform(str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", "")))


def familiar_name(name: str) -> str:
    """docker's short form: docker.io/library/busybox:latest -> busybox:latest."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def ref_object(name: str) -> str:
    """The tag (or digest) of a name, what OCI's ref.name annotation holds."""
    if "@" in name:
        return name.rsplit("@", 1)[1]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else name


class Exporter:
    def __init__(self, db: DB, content: ContentStore) -> None:
        self.db = db
        self.content = content

    async def _read_json(self, ns: str, dgst: str) -> Any:
        chunks = [c async for _, c in await self.content.read(ns, dgst)]
        return json.loads(b"".join(chunks))

    async def export(
        self, ns: str, names: list[str], opts: ExportOptions, out: DataSender, progress: ProgressFunc
    ) -> None:
        """Write the images ``names`` as an OCI layout tar to ``out``."""
        wanted = [platforms.normalize(p) for p in opts.platforms] or [platforms.default()]
        imgs = []
        for name in names:
            try:
                imgs.append(await self.db.view(functools.partial(imagestore.get, ns=ns, name=name)))
            except errdefs.NotFound:
                raise errdefs.NotFound(f"image {name!r}") from None
        blobs: dict[str, int] = {}  # digest -> size, in write order, children first
        docker: dict[str, tuple[dict[str, Any], list[str]]] = {}  # manifest digest -> (manifest, names)
        index_entries = []

        async def add_manifest(desc: dict[str, Any]) -> dict[str, Any]:
            manifest = await self._read_json(ns, desc["digest"])
            for d in [manifest["config"], *manifest.get("layers", [])]:
                await self.content.info(ns, d["digest"])  # NotFound: the image is incomplete
                blobs[d["digest"]] = int(d["size"])
            blobs[desc["digest"]] = int(desc["size"])
            return dict(manifest)

        for img in imgs:
            t = img.target
            top = {"mediaType": t.media_type, "digest": t.digest, "size": t.size}
            chosen: list[tuple[dict[str, Any], dict[str, Any]]] = []
            if t.media_type in INDEX_TYPES:
                index = await self._read_json(ns, t.digest)
                for m in index.get("manifests", []):
                    if m.get("mediaType") not in MANIFEST_TYPES:
                        if m.get("mediaType") not in INDEX_TYPES:
                            # A blob the index itself names (a checkpoint's criu tar, spec, rw
                            # layer): it goes with the index, whatever the platforms.
                            await self.content.info(ns, m["digest"])
                            blobs[m["digest"]] = int(m["size"])
                        continue
                    p = _platform_of(m)
                    if opts.all_platforms:
                        # "All platforms" means all that are here, as containerd's local export.
                        try:
                            await self.content.info(ns, m["digest"])
                        except errdefs.NotFound:
                            continue
                    elif p is not None and not any(platforms.matches(p, w) for w in wanted):
                        continue
                    chosen.append((m, await add_manifest(m)))
                if not chosen:
                    raise errdefs.NotFound(f"image {img.name!r}: no manifest for the requested platforms")
                blobs[t.digest] = t.size
            elif t.media_type in MANIFEST_TYPES:
                chosen.append((top, await add_manifest(top)))
            else:
                raise errdefs.InvalidArgument(f"image {img.name!r}: only manifests may be exported")
            first_desc, first = chosen[0]
            docker.setdefault(first_desc["digest"], (first, []))[1].append(img.name)
            top["annotations"] = {ANNOTATION_IMAGE_NAME: img.name, ANNOTATION_REF_NAME: ref_object(img.name)}
            index_entries.append(top)

        await out.write(
            tar_header("blobs/", 0, directory=True) + tar_header("blobs/sha256/", 0, directory=True)
        )
        for dgst, size in blobs.items():
            progress("exporting", dgst, 0, size)
            await out.write(tar_header(f"blobs/sha256/{dgst.split(':', 1)[1]}", size))
            written = 0
            async for _, chunk in await self.content.read(ns, dgst):
                await out.write(chunk)
                written += len(chunk)
            if written != size:
                raise errdefs.FailedPrecondition(f"content {dgst}: {written} bytes, expected {size}")
            await out.write(tar_padding(size))
            progress("exported", dgst, size, size)
        files = [
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            (
                "index.json",
                json.dumps(
                    {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": index_entries}
                ).encode(),
            ),
        ]
        if not opts.skip_docker_manifest:
            records = [
                {
                    "Config": "blobs/sha256/" + m["config"]["digest"].split(":", 1)[1],
                    "RepoTags": [familiar_name(n) for n in names_],
                    "Layers": ["blobs/sha256/" + ly["digest"].split(":", 1)[1] for ly in m.get("layers", [])],
                }
                for m, names_ in docker.values()
            ]
            files.append(("manifest.json", json.dumps(records).encode()))
        for name, data in files:
            await out.write(tar_header(name, len(data)) + data + tar_padding(len(data)))
        await out.write(TAR_END)


# -- import -----------------------------------------------------------------------------------------


@dataclass
class ImportOptions:
    base_name: str = ""  # names ``<base>:<ref.name>`` for entries carrying only a tag
    labels: dict[str, str] = field(default_factory=dict)
    unpacks: list[tuple[platforms.Platform, str]] = field(default_factory=list)  # (platform, snapshotter)


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    gzipped: bool


class Importer:
    def __init__(
        self,
        db: DB,
        content: ContentStore,
        snapshotters: dict[str, SnapshotStore],
        differ: Differ,
        exchange: Exchange,
    ) -> None:
        self.db = db
        self.content = content
        self.snapshotters = snapshotters
        self.differ = differ
        self.exchange = exchange

    async def import_(
        self, ns: str, chunks: AsyncIterator[bytes], opts: ImportOptions, progress: ProgressFunc
    ) -> list[imagestore.Image]:
        for _, sn in opts.unpacks:
            if sn not in self.snapshotters:
                raise errdefs.InvalidArgument(f"snapshotter not loaded: {sn}")
        lease = unpack.random_id("import")
        expiry = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=24)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        await self.db.update(lambda c: leasestore.create(c, ns, lease, {"containerd.io/gc.expire": expiry}))
        try:
            blobs, docs = await self._read_archive(ns, lease, ByteReader(chunks), progress)
            try:
                if "index.json" in docs:
                    targets = self._oci_targets(docs["index.json"], blobs, opts)
                elif "manifest.json" in docs:
                    targets = await self._docker_targets(ns, lease, docs["manifest.json"], blobs)
                else:
                    raise errdefs.InvalidArgument("archive has neither index.json nor manifest.json")
            except (KeyError, TypeError, ValueError) as e:
                doc = "index.json" if "index.json" in docs else "manifest.json"
                raise errdefs.InvalidArgument(f"archive {doc}: invalid: {e!r}") from None
            for _, desc in targets:
                try:
                    manifests = await self._label_tree(ns, desc)
                except (KeyError, TypeError, ValueError) as e:
                    raise errdefs.InvalidArgument(
                        f"archive: image {desc['digest']}: invalid: {e!r}"
                    ) from None
                for plat, sn in opts.unpacks:
                    for mdesc, manifest in manifests:
                        p = _platform_of(mdesc)
                        if p is None or platforms.matches(p, plat):
                            await self._unpack(ns, lease, manifest, sn, progress)
                            break
            # Only once everything is stored and unpacked: a failure above leaves no image.
            out = []
            for name, desc in targets:
                img = await self._store_image(ns, name, desc, opts.labels)
                progress("saved", img.name, 0, 0)
                out.append(img)
            return out
        finally:
            try:
                await self.db.update(lambda c: leasestore.delete(c, ns, lease))
            except errdefs.NotFound:
                pass

    async def _read_archive(
        self, ns: str, lease: str, r: ByteReader, progress: ProgressFunc
    ) -> tuple[dict[str, _Blob], dict[str, bytes]]:
        """Store every regular file as content (by path); keep the layout's JSON files in memory."""
        blobs: dict[str, _Blob] = {}
        docs: dict[str, bytes] = {}
        while (m := await _next_member(r)) is not None:
            padded = m.size + (-m.size % tarfile.BLOCKSIZE)
            if not m.regular:
                await _skip(r, padded)
                continue
            if m.name in ("index.json", "manifest.json", "oci-layout", "repositories"):
                if m.size > JSON_LIMIT:
                    raise errdefs.InvalidArgument(f"archive {m.name} too large")
                docs[m.name] = (await r.read_exact(padded))[: m.size]
                continue
            blobs[m.name] = await self._store_member(ns, lease, r, m, progress)
            await _skip(r, padded - m.size)
        return blobs, docs

    async def _store_member(
        self, ns: str, lease: str, r: ByteReader, m: _Member, progress: ProgressFunc
    ) -> _Blob:
        # A layout names its blobs by digest: knowing it lets an existing blob be skipped.
        parts = m.name.split("/")
        expected = ""
        if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256" and len(parts[2]) == 64:
            expected = f"sha256:{parts[2]}"
        try:
            w = await self.content.writer(ns, f"tar-{m.name}-{lease}", m.size, expected, lease)
        except errdefs.AlreadyExists:
            head = await r.read_exact(min(2, m.size))
            await _skip(r, m.size - len(head))
            progress("exists", expected, m.size, m.size)
            return _Blob(expected, m.size, head == b"\x1f\x8b")
        head = b""
        try:
            left = m.size
            if expected and w.status().offset == m.size:
                # Another namespace has these bytes (the shared policy): commit without them.
                head = await r.read_exact(min(2, m.size))
                await _skip(r, m.size - len(head))
                left = 0
            elif w.status().offset:
                await w.truncate(0)  # a stale ingest: the archive is the source of truth
            progress("importing", m.name, 0, m.size)
            while left:
                chunk = await r.read_some(min(left, 1 << 20))
                if not head:
                    head = chunk[:2]
                await w.write(chunk)
                left -= len(chunk)
            dgst = expected or w.digest()
            try:
                await w.commit(m.size, expected, {})
            except errdefs.AlreadyExists:
                pass  # the same bytes arrived meanwhile (or another member had them)
            except errdefs.FailedPrecondition as e:
                raise errdefs.FailedPrecondition(f"archive {m.name}: digest mismatch: {e.message}") from None
        except BaseException:
            w.close()
            await self.content.abort(ns, w.ingest.ref, lease)
            raise
        finally:
            w.close()
        progress("imported", dgst, m.size, m.size)
        return _Blob(dgst, m.size, head == b"\x1f\x8b")

    def _oci_targets(
        self, index_json: bytes, blobs: dict[str, _Blob], opts: ImportOptions
    ) -> list[tuple[str, dict[str, Any]]]:
        index = _json("index.json", index_json)
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise errdefs.InvalidArgument("archive index.json: not an OCI image index")
        out = []
        for d in index.get("manifests", []):
            annotations = d.get("annotations") or {}
            name = annotations.get(ANNOTATION_IMAGE_NAME, "")
            ref_name = annotations.get(ANNOTATION_REF_NAME, "")
            if not name and ref_name:
                base = opts.base_name or f"import-{datetime.date.today().isoformat()}"
                name = f"{base}:{ref_name}" if ":" not in ref_name and "/" not in ref_name else ref_name
            if not name:
                continue  # unnamed entries are stored but make no image, as containerd does
            path = "blobs/" + "/".join(str(d["digest"]).split(":", 1))
            if path not in blobs:
                raise errdefs.NotFound(f"archive: {path} for {name} is missing")
            desc = {"mediaType": d.get("mediaType", ""), "digest": d["digest"], "size": int(d["size"])}
            out.append((name, desc))
        return out

    async def _docker_targets(
        self, ns: str, lease: str, manifest_json: bytes, blobs: dict[str, _Blob]
    ) -> list[tuple[str, dict[str, Any]]]:
        from pyctr.daemon.remotes import reference as refmod

        out = []
        entries = _json("manifest.json", manifest_json)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise errdefs.InvalidArgument("archive manifest.json: not a list of docker image records")
        for entry in entries:
            try:
                config = blobs[os.path.normpath(str(entry["Config"]))]
                layers = [blobs[os.path.normpath(str(p))] for p in entry.get("Layers") or []]
            except KeyError as e:
                raise errdefs.NotFound(f"archive: {e.args[0]} named in manifest.json is missing") from None
            manifest = {
                "schemaVersion": 2,
                "mediaType": MT_DOCKER_MANIFEST,
                "config": {"mediaType": MT_DOCKER_CONFIG, "digest": config.digest, "size": config.size},
                "layers": [
                    {
                        "mediaType": MT_DOCKER_LAYER_GZIP if b.gzipped else MT_DOCKER_LAYER,
                        "digest": b.digest,
                        "size": b.size,
                    }
                    for b in layers
                ],
            }
            data = json.dumps(manifest, indent=2).encode()
            dgst = "sha256:" + hashlib.sha256(data).hexdigest()
            await self._write_blob(ns, lease, f"manifest-{dgst}", dgst, data)
            desc = {"mediaType": MT_DOCKER_MANIFEST, "digest": dgst, "size": len(data)}
            for tag in entry.get("RepoTags") or []:
                out.append((str(refmod.parse(tag)), desc))
        return out

    async def _write_blob(self, ns: str, lease: str, ref: str, dgst: str, data: bytes) -> None:
        try:
            w = await self.content.writer(ns, ref, len(data), dgst, lease)
        except errdefs.AlreadyExists:
            return
        try:
            await w.truncate(0)
            await w.write(data)
            await w.commit(len(data), dgst, {})
        except errdefs.AlreadyExists:
            pass
        finally:
            w.close()

    async def _read_json(self, ns: str, dgst: str) -> Any:
        chunks = [c async for _, c in await self.content.read(ns, dgst)]
        return _json(dgst, b"".join(chunks))

    async def _label(self, ns: str, dgst: str, labels: dict[str, str]) -> None:
        await unpack.label(self.content, ns, dgst, labels)

    async def _label_tree(self, ns: str, desc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Give the index/manifests the gc.ref labels a pull gives them; return the manifests here."""
        mt = desc.get("mediaType", "")
        if mt and mt not in INDEX_TYPES and mt not in MANIFEST_TYPES:
            return []  # a plain blob an index names (a checkpoint's criu tar): its reference is enough
        doc = await self._read_json(ns, desc["digest"])
        mt = mt or doc.get("mediaType", "")
        if mt in INDEX_TYPES or "manifests" in doc:
            children = doc.get("manifests", [])
            await self._label(
                ns,
                desc["digest"],
                {f"containerd.io/gc.ref.content.m.{i}": c["digest"] for i, c in enumerate(children)},
            )
            out = []
            for child in children:
                try:
                    out.extend(await self._label_tree(ns, child))
                except errdefs.NotFound:
                    continue  # a platform left out of the archive
            return out
        labels = {"containerd.io/gc.ref.content.config": doc["config"]["digest"]}
        for i, layer in enumerate(doc.get("layers", [])):
            labels[f"containerd.io/gc.ref.content.l.{i}"] = layer["digest"]
        await self._label(ns, desc["digest"], labels)
        return [(desc, doc)]

    async def _unpack(
        self, ns: str, lease: str, manifest: dict[str, Any], snapshotter: str, progress: ProgressFunc
    ) -> None:
        config_digest = manifest["config"]["digest"]
        config = await self._read_json(ns, config_digest)
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        layers = manifest.get("layers", [])
        if len(diff_ids) != len(layers):
            raise errdefs.FailedPrecondition(
                f"mismatched image rootfs and manifest layers: {len(diff_ids)} diff IDs, {len(layers)} layers"
            )
        store = self.snapshotters[snapshotter]
        chains = unpack.chain_ids(diff_ids)
        for i, layer in enumerate(layers):
            desc = DiffDescriptor(layer["mediaType"], layer["digest"], int(layer["size"]), {})
            progress("extracting", layer["digest"], 0, desc.size)
            parent = chains[i - 1] if i else ""
            if await unpack.apply_layer(
                ns, lease, store, self.differ, self.content, desc, diff_ids[i], chains[i], parent
            ):
                progress("extracted", layer["digest"], desc.size, desc.size)
        if chains:
            await self._label(ns, config_digest, {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]})

    async def _store_image(
        self, ns: str, name: str, desc: dict[str, Any], labels: dict[str, str]
    ) -> imagestore.Image:
        target = imagestore.Descriptor(desc["mediaType"], desc["digest"], int(desc["size"]), {})
        return await unpack.store_image(self.db, self.exchange, ns, name, target, labels)
