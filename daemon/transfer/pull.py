"""Server-side pull: from a registry into the content store, the image store and snapshots.

What a pull leaves behind is exactly what ``ctr images pull`` leaves, so either client can use
the other's images: blobs labelled ``containerd.io/distribution.source.<host>``, an index
labelled ``containerd.io/gc.ref.content.m.<i>`` for every child, a manifest labelled
``…content.config`` and ``…content.l.<i>``, layers labelled ``containerd.io/uncompressed`` once
unpacked, snapshots named by chain ID, and the config labelled
``containerd.io/gc.ref.snapshot.<snapshotter>`` with the top chain ID.

Everything happens under a lease (expiring after a day) so the collector leaves half-pulled
content alone; the lease goes at the end, and the image record keeps what it references. The
lease is written while the reference resolves (nothing is stored before both are done).
Layers download in parallel (bounded) and are unpacked in order as soon as each has arrived;
they start as soon as their manifest is read, while its config is fetched and stored.
Concurrent pulls of the same blob in a namespace share one download; when it fails, each of the
others tries on its own (the failure may be the first puller's credentials, not theirs).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyctr.api import errdefs, platforms
from pyctr.api.log import get_logger
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.diff.differ import Descriptor as DiffDescriptor
from pyctr.daemon.diff.differ import Differ
from pyctr.daemon.events import Exchange
from pyctr.daemon.metadata import images as imagestore
from pyctr.daemon.metadata import leases as leasestore
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.remotes import reference as refmod
from pyctr.daemon.remotes.auth import CredentialsFunc
from pyctr.daemon.remotes.registry import Descriptor, RegistryClient
from pyctr.daemon.snapshots.store import SnapshotStore
from pyctr.daemon.transfer import unpack

log = get_logger("pyctrd.pull")

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
MAX_DOWNLOADS = 3


@dataclass(frozen=True)
class Progress:
    event: str
    name: str = ""
    parents: tuple[str, ...] = ()
    progress: int = 0
    total: int = 0


ProgressFunc = Callable[[Progress], None]


class ClientFactory(Protocol):
    """A new RegistryClient for one transfer, with the caller's credentials and headers."""

    def __call__(
        self, *, credentials: CredentialsFunc | None = None, headers: dict[str, str] | None = None
    ) -> RegistryClient: ...


@dataclass
class PullOptions:
    platforms: list[platforms.Platform] = field(default_factory=lambda: [platforms.default()])
    all_platforms: bool = False
    unpack: bool = True
    snapshotter: str = "overlayfs"
    labels: dict[str, str] = field(default_factory=dict)
    name: str = ""  # store the image under this name instead of the reference
    credentials: CredentialsFunc | None = None  # the caller's, asked per registry host
    headers: dict[str, str] = field(default_factory=dict)  # sent with every registry request


def _platform_of(desc: Descriptor) -> platforms.Platform | None:
    p = desc.platform
    if not p:
        return None
    return platforms.Platform(str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", "")))


class Puller:
    def __init__(
        self,
        db: DB,
        content: ContentStore,
        snapshotters: dict[str, SnapshotStore],
        differ: Differ,
        exchange: Exchange,
        client_factory: ClientFactory,
    ) -> None:
        self.db = db
        self.content = content
        self.snapshotters = snapshotters
        self.differ = differ
        self.exchange = exchange
        self.client_factory = client_factory
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def pull(
        self, ns: str, ref_text: str, opts: PullOptions, progress: ProgressFunc | None = None
    ) -> imagestore.Image:
        report = progress or (lambda p: None)
        ref = refmod.parse(ref_text)
        if opts.unpack and opts.snapshotter not in self.snapshotters:
            raise errdefs.InvalidArgument(f"snapshotter not loaded: {opts.snapshotter}")
        lease = unpack.random_id("pull")
        expiry = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=24)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        leased = asyncio.ensure_future(
            self.db.update(lambda c: leasestore.create(c, ns, lease, {"containerd.io/gc.expire": expiry}))
        )
        client = self.client_factory(credentials=opts.credentials, headers=opts.headers)
        configs: list[asyncio.Future[None]] = []  # each manifest's config and itself, stored
        try:
            report(Progress(f"Resolving from {ref}", str(ref)))
            _, top = await client.resolve(ref)
            await leased
            report(Progress(f"Pulling from {ref}", str(ref)))
            source = {f"containerd.io/distribution.source.{ref.domain.split(':')[0]}": ref.path}
            manifests = await self._fetch_tree(ns, lease, client, ref, top, opts, source, configs)
            for (manifest_desc, manifest), config in zip(manifests, configs, strict=True):
                # As containerd: every chosen manifest's layers are fetched, but only those for
                # the requested platforms are unpacked (--all-platforms fetches, not unpacks, all).
                plat = _platform_of(manifest_desc)
                if opts.unpack and (plat is None or any(platforms.matches(plat, w) for w in opts.platforms)):
                    await self._unpack(
                        ns, lease, client, ref, manifest_desc, manifest, config, opts, source, report
                    )
                else:
                    await self._fetch_layers(ns, lease, client, ref, manifest_desc, manifest, source, report)
                    await config
            image = await self._store_image(ns, opts.name or str(ref), top, opts.labels)
            report(Progress("saved", image.name))
            report(Progress(f"Completed pull from {ref}", str(ref)))
            return image
        finally:
            for task in configs:
                task.cancel()
            # The lease is not cancelled: its transaction may commit anyway, and it must go again.
            await asyncio.gather(leased, *configs, return_exceptions=True)
            await client.close()
            if not leased.cancelled() and leased.exception() is None:
                try:
                    await self.db.update(lambda c: leasestore.delete(c, ns, lease))
                except errdefs.NotFound:
                    pass

    # -- blobs ---------------------------------------------------------------------------------

    async def _ensure_labels(self, ns: str, dgst: str, labels: dict[str, str]) -> None:
        await unpack.label(self.content, ns, dgst, labels)

    async def _store_bytes(
        self, ns: str, lease: str, kind: str, desc: Descriptor, data: bytes, labels: dict[str, str]
    ) -> None:
        try:
            w = await self.content.writer(ns, f"{kind}-{desc.digest}", desc.size, desc.digest, lease)
        except errdefs.AlreadyExists:
            await self._ensure_labels(ns, desc.digest, labels)
            return
        try:
            if w.status().offset != desc.size:
                await w.truncate(0)
                await w.write(data)
            await w.commit(desc.size, desc.digest, labels)
        except errdefs.AlreadyExists:
            await self._ensure_labels(ns, desc.digest, labels)
        finally:
            w.close()

    async def _download(
        self,
        ns: str,
        lease: str,
        client: RegistryClient,
        ref: refmod.Reference,
        desc: Descriptor,
        labels: dict[str, str],
        report: ProgressFunc,
        parents: tuple[str, ...],
    ) -> None:
        """Fetch one blob into the store (shared with concurrent pulls of the same blob)."""
        key = (ns, desc.digest)
        while (running := self._inflight.get(key)) is not None:
            try:
                await asyncio.shield(running)
            except BaseException:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are the ones cancelled
                # The other pull's failure (its credentials, its cancellation) need not be ours:
                # fetch it ourselves (or wait for whoever started again first).
                continue
            await self._ensure_labels(ns, desc.digest, labels)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            await self._download_once(ns, lease, client, ref, desc, labels, report, parents)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here, so an unwatched future never warns
            raise
        finally:
            self._inflight.pop(key, None)

    async def _download_once(
        self,
        ns: str,
        lease: str,
        client: RegistryClient,
        ref: refmod.Reference,
        desc: Descriptor,
        labels: dict[str, str],
        report: ProgressFunc,
        parents: tuple[str, ...],
    ) -> None:
        try:
            w = await self.content.writer(ns, f"layer-{desc.digest}", desc.size, desc.digest, lease)
        except errdefs.AlreadyExists:
            await self._ensure_labels(ns, desc.digest, labels)
            report(Progress("already exists", desc.digest, parents, desc.size, desc.size))
            return
        try:
            offset = w.status().offset
            if offset > desc.size:
                await w.truncate(0)  # more bytes than the blob has: start over
                offset = 0
            if offset < desc.size:
                # Resumes an earlier partial download of this blob from where it stopped.
                report(Progress("downloading", desc.digest, parents, offset, desc.size))
                last = time.monotonic()
                async for chunk in client.fetch(ref, desc, offset):
                    await w.write(chunk)
                    offset += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.1:
                        report(Progress("downloading", desc.digest, parents, offset, desc.size))
                        last = now
            await w.commit(desc.size, desc.digest, labels)
        except errdefs.AlreadyExists:
            await self._ensure_labels(ns, desc.digest, labels)
        except errdefs.FailedPrecondition:
            # Wrong bytes: drop them, so the next attempt starts clean instead of resuming them.
            w.close()
            await self.content.abort(ns, w.ingest.ref, lease)
            raise
        finally:
            w.close()
        report(Progress("complete", desc.digest, parents, desc.size, desc.size))

    # -- the tree ------------------------------------------------------------------------------

    async def _fetch_tree(
        self,
        ns: str,
        lease: str,
        client: RegistryClient,
        ref: refmod.Reference,
        top: Descriptor,
        opts: PullOptions,
        source: dict[str, str],
        configs: list[asyncio.Future[None]],
    ) -> list[tuple[Descriptor, dict[str, Any]]]:
        """Store the index (if any); return the chosen manifests. Each one's config is fetched and
        stored, then the manifest itself, by a task added to ``configs`` (one per manifest, in order)."""
        data = await client.fetch_bytes(ref, top)
        doc = json.loads(data)
        media_type = top.media_type or doc.get("mediaType", "")
        if media_type in INDEX_TYPES:
            children = [_descriptor(m) for m in doc.get("manifests", [])]
            labels = dict(source)
            for i, child in enumerate(children):
                labels[f"containerd.io/gc.ref.content.m.{i}"] = child.digest
            chosen = [
                c
                for c in children
                if c.media_type in MANIFEST_TYPES
                and (
                    opts.all_platforms
                    or any(
                        (p := _platform_of(c)) is not None and platforms.matches(p, w) for w in opts.platforms
                    )
                )
            ]
            if not chosen:
                wanted = ", ".join(str(p) for p in opts.platforms)
                raise errdefs.NotFound(f"no match for platform in manifest {top.digest}: {wanted}")
            out = []
            for child in chosen:
                out.append(await self._fetch_manifest(ns, lease, client, ref, child, source, configs))
            await self._store_bytes(ns, lease, "index", top, data, labels)
            return out
        if media_type in MANIFEST_TYPES:
            return [await self._fetch_manifest(ns, lease, client, ref, top, source, configs, data)]
        if "v1+prettyjws" in media_type or doc.get("schemaVersion") == 1:
            raise errdefs.NotImplementedErr("Docker schema 1 manifests are not supported")
        raise errdefs.NotImplementedErr(f"unsupported manifest media type {media_type}")

    async def _fetch_manifest(
        self,
        ns: str,
        lease: str,
        client: RegistryClient,
        ref: refmod.Reference,
        desc: Descriptor,
        source: dict[str, str],
        configs: list[asyncio.Future[None]],
        data: bytes | None = None,
    ) -> tuple[Descriptor, dict[str, Any]]:
        if data is None:
            data = await client.fetch_bytes(ref, desc)
        manifest = json.loads(data)
        config = _descriptor(manifest["config"])
        labels = dict(source)
        labels["containerd.io/gc.ref.content.config"] = config.digest
        for i, layer in enumerate(manifest.get("layers", [])):
            labels[f"containerd.io/gc.ref.content.l.{i}"] = layer["digest"]

        async def store() -> None:
            config_data = await client.fetch_bytes(ref, config)
            await self._store_bytes(ns, lease, "config", config, config_data, dict(source))
            await self._store_bytes(ns, lease, "manifest", desc, data, labels)

        # The layers need not wait for the config and the stored manifest (the lease keeps all).
        configs.append(asyncio.ensure_future(store()))
        return desc, manifest

    async def _fetch_layers(
        self,
        ns: str,
        lease: str,
        client: RegistryClient,
        ref: refmod.Reference,
        manifest_desc: Descriptor,
        manifest: dict[str, Any],
        source: dict[str, str],
        report: ProgressFunc,
    ) -> None:
        """Download a manifest's layers without unpacking them (bounded, like _unpack)."""
        sem = asyncio.Semaphore(MAX_DOWNLOADS)
        parents = (manifest_desc.digest,)

        async def download(layer: Descriptor) -> None:
            async with sem:
                await self._download(ns, lease, client, ref, layer, dict(source), report, parents)

        downloads = [asyncio.ensure_future(download(_descriptor(m))) for m in manifest.get("layers", [])]
        try:
            for d in downloads:
                await d  # the first failure ends the pull, and the finally stops the rest
        finally:
            for d in downloads:
                d.cancel()
            await asyncio.gather(*downloads, return_exceptions=True)

    # -- unpacking -----------------------------------------------------------------------------

    async def _unpack(
        self,
        ns: str,
        lease: str,
        client: RegistryClient,
        ref: refmod.Reference,
        manifest_desc: Descriptor,
        manifest: dict[str, Any],
        config_stored: asyncio.Future[None],
        opts: PullOptions,
        source: dict[str, str],
        report: ProgressFunc,
    ) -> None:
        config_desc = _descriptor(manifest["config"])
        layers = [_descriptor(m) for m in manifest.get("layers", [])]
        parents = (manifest_desc.digest,)
        sem = asyncio.Semaphore(MAX_DOWNLOADS)

        async def download(layer: Descriptor) -> None:
            async with sem:
                await self._download(ns, lease, client, ref, layer, dict(source), report, parents)

        downloads = [asyncio.ensure_future(download(layer)) for layer in layers]
        store = self.snapshotters[opts.snapshotter]
        try:
            await config_stored
            chunks = [c async for _, c in await self.content.read(ns, config_desc.digest)]
            config = json.loads(b"".join(chunks))
            diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
            if len(diff_ids) != len(layers):
                raise errdefs.FailedPrecondition(
                    f"mismatched image rootfs and manifest layers: {len(diff_ids)} diff IDs, {len(layers)} layers"
                )
            chains = unpack.chain_ids(diff_ids)
            for i, layer in enumerate(layers):
                await downloads[i]
                await self._apply(
                    ns, lease, store, layer, diff_ids[i], chains[i], chains[i - 1] if i else "", report
                )
        finally:
            for d in downloads:
                d.cancel()
            await asyncio.gather(*downloads, return_exceptions=True)
        if chains:
            label = {f"containerd.io/gc.ref.snapshot.{opts.snapshotter}": chains[-1]}
            await self._ensure_labels(ns, config_desc.digest, label)

    async def _apply(
        self,
        ns: str,
        lease: str,
        store: SnapshotStore,
        layer: Descriptor,
        diff_id: str,
        chain: str,
        parent: str,
        report: ProgressFunc,
    ) -> None:
        desc = DiffDescriptor(layer.media_type, layer.digest, layer.size, {})
        report(Progress("extracting", layer.digest, (), 0, layer.size))
        if await unpack.apply_layer(
            ns, lease, store, self.differ, self.content, desc, diff_id, chain, parent
        ):
            report(Progress("extracted", layer.digest, (), layer.size, layer.size))

    # -- the image record ------------------------------------------------------------------------

    async def _store_image(
        self, ns: str, name: str, top: Descriptor, labels: dict[str, str]
    ) -> imagestore.Image:
        target = imagestore.Descriptor(top.media_type, top.digest, top.size, dict(top.annotations))
        return await unpack.store_image(self.db, self.exchange, ns, name, target, labels)


def _descriptor(d: dict[str, Any]) -> Descriptor:
    return Descriptor(
        media_type=str(d.get("mediaType", "")),
        digest=str(d["digest"]),
        size=int(d.get("size", 0)),
        annotations=dict(d.get("annotations") or {}),
        platform=d.get("platform"),
        urls=tuple(d.get("urls") or ()),
    )
