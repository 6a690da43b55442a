"""containerd.services.transfer.v1.Transfer: the daemon moves images itself, reporting progress.

Supported pairs (source -> destination):

    OCIRegistry        -> ImageStore          pull (with unpack when the store asks for it)
    ImageStore         -> OCIRegistry         push
    ImageStore         -> ImageExportStream   export: an OCI layout tar down a data side stream
    ImageImportStream  -> ImageStore          import: an OCI layout or docker-archive tar

Other pairs answer Unimplemented, naming the pair. Progress goes to the side stream named in the
options, as ``containerd.types.transfer.Progress`` messages; the stream is closed when the
transfer ends. The data streams of import and export are flow-controlled as
:mod:`pyctr.daemon.transfer.archive` describes, and closed when the transfer ends.

A registry's ``RegistryResolver`` may name an ``auth_stream``: the registry client then asks the
caller for credentials on it (:class:`pyctr.daemon.transfer.streams.AuthCallback`), and it is
closed when the transfer ends; without one, registries are accessed anonymously. The resolver's
``headers`` go with every registry request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyctr.api import namespaces, platforms, typeurl
from pyctr.api._pb.containerd.services.transfer import v1 as pb
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument, NotFound, NotImplementedErr
from pyctr.daemon import plugin
from pyctr.daemon.transfer.streams import AuthCallback, SideStream, StreamManager

if TYPE_CHECKING:
    from pyctr.daemon.remotes.auth import CredentialsFunc
    from pyctr.daemon.transfer.archive import Exporter, Importer, ImportOptions
    from pyctr.daemon.transfer.pull import Progress, Puller, PullOptions
    from pyctr.daemon.transfer.push import Pusher


def _decode(msg: object, what: str) -> object:
    if msg is None:
        raise InvalidArgument(f"transfer {what} must be set")
    try:
        return typeurl.unmarshal(msg.type_url, msg.value)  # type: ignore[attr-defined]
    except KeyError:
        raise NotImplementedErr(f"transfer {what} type {msg.type_url} is not supported") from None  # type: ignore[attr-defined]


def pull_options(
    dest: tt.ImageStore, credentials: CredentialsFunc | None = None, headers: dict[str, str] | None = None
) -> PullOptions:
    from pyctr.daemon.transfer.pull import PullOptions

    wanted = [
        platforms.normalize(platforms.Platform(p.os, p.architecture, p.variant)) for p in dest.platforms
    ]
    opts = PullOptions(
        platforms=wanted or [platforms.default()],
        all_platforms=dest.all_metadata and not wanted,
        unpack=bool(dest.unpacks),
        labels=dict(dest.labels),
        name=dest.name,
        credentials=credentials,
        headers=dict(headers or {}),
    )
    if dest.unpacks:
        opts.snapshotter = dest.unpacks[0].snapshotter or "overlayfs"
    return opts


def import_options(dest: tt.ImageStore) -> ImportOptions:
    from pyctr.daemon.transfer.archive import ImportOptions

    # containerd's ctr passes --base-name as an extra reference marked as a prefix.
    base = next((r.name for r in dest.extra_references if r.is_prefix), "") or dest.name
    return ImportOptions(
        base_name=base,
        labels=dict(dest.labels),
        unpacks=[
            (
                platforms.normalize(
                    platforms.Platform(u.platform.os, u.platform.architecture, u.platform.variant)
                )
                if u.platform is not None and u.platform.os
                else platforms.default(),
                u.snapshotter or "overlayfs",
            )
            for u in dest.unpacks
        ],
    )


def _remote(
    registry: tt.OciRegistry, auth_stream: SideStream | None
) -> tuple[CredentialsFunc | None, dict[str, str]]:
    """What the registry client needs from the caller: its credentials and extra headers."""
    credentials = AuthCallback(auth_stream, registry.reference) if auth_stream is not None else None
    headers = dict(registry.resolver.headers) if registry.resolver is not None else {}
    return credentials, headers


@dataclass
class Workers:
    """How the service builds what does the work; called on first use (see TransferService)."""

    puller: Callable[[], Puller]
    pusher: Callable[[], Pusher]
    exporter: Callable[[], Exporter]
    importer: Callable[[], Importer]


class TransferService(pb.TransferBase):
    def __init__(self, workers: Workers, streams: StreamManager) -> None:
        # The registry client is imported on the first transfer, not at daemon start: most
        # daemons never pull.
        self._workers = workers
        self._puller: Puller | None = None
        self._pusher: Pusher | None = None
        self.streams = streams

    @property
    def puller(self) -> Puller:
        if self._puller is None:
            self._puller = self._workers.puller()
        return self._puller

    @property
    def pusher(self) -> Pusher:
        if self._pusher is None:
            self._pusher = self._workers.pusher()
        return self._pusher

    def _data_stream(self, ns: str, stream_id: str) -> SideStream:
        if not stream_id:
            raise InvalidArgument("transfer data stream id must be set")
        try:
            return self.streams.get(ns, stream_id)
        except NotFound:
            raise NotFound(f"data stream {stream_id}") from None

    def _auth_stream(self, ns: str, registry: tt.OciRegistry) -> SideStream | None:
        stream_id = registry.resolver.auth_stream if registry.resolver is not None else ""
        if not stream_id:
            return None
        try:
            return self.streams.get(ns, stream_id)
        except NotFound:
            raise NotFound(f"auth stream {stream_id}") from None

    async def transfer(self, message: pb.TransferRequest) -> Empty:
        ns = namespaces.required()
        progress_stream: SideStream | None = None
        if message.options is not None and message.options.progress_stream:
            try:
                progress_stream = self.streams.get(ns, message.options.progress_stream)
            except NotFound:
                raise NotFound(f"progress stream {message.options.progress_stream}") from None

        def report(p: Progress) -> None:
            if progress_stream is not None:
                progress_stream.send(
                    tt.Progress(
                        event=p.event,
                        name=p.name,
                        parents=list(p.parents),
                        progress=p.progress,
                        total=p.total,
                    )
                )

        def report_blob(event: str, name: str, progress: int, total: int) -> None:
            if progress_stream is not None:
                progress_stream.send(tt.Progress(event=event, name=name, progress=progress, total=total))

        auth_stream: SideStream | None = None
        try:
            src = _decode(message.source, "source")
            dst = _decode(message.destination, "destination")
            if isinstance(src, tt.OciRegistry) and isinstance(dst, tt.ImageStore):
                auth_stream = self._auth_stream(ns, src)
                credentials, headers = _remote(src, auth_stream)
                await self.puller.pull(ns, src.reference, pull_options(dst, credentials, headers), report)
                return Empty()
            if isinstance(src, tt.ImageStore) and isinstance(dst, tt.OciRegistry):
                if not src.name:
                    raise InvalidArgument("push: the source image name must be set")
                auth_stream = self._auth_stream(ns, dst)
                credentials, headers = _remote(dst, auth_stream)
                await self.pusher.push(
                    ns, src.name, dst.reference, report, credentials=credentials, headers=headers
                )
                return Empty()
            if isinstance(src, tt.ImageStore) and isinstance(dst, tt.ImageExportStream):
                await self._export(ns, src, dst, report_blob)
                return Empty()
            if isinstance(src, tt.ImageImportStream) and isinstance(dst, tt.ImageStore):
                await self._import(ns, src, dst, report_blob)
                return Empty()
            raise NotImplementedErr(
                f"transfer from {type(src).__name__} to {type(dst).__name__} is not implemented"
            )
        finally:
            if progress_stream is not None:
                progress_stream.close()
            if auth_stream is not None:
                auth_stream.close()

    async def _export(
        self,
        ns: str,
        src: tt.ImageStore,
        dst: tt.ImageExportStream,
        report: Callable[[str, str, int, int], None],
    ) -> None:
        from pyctr.daemon.transfer.archive import DataSender, ExportOptions

        side = self._data_stream(ns, dst.stream)
        names = [n for n in [src.name, *(r.name for r in src.extra_references)] if n]
        if not names:
            side.close()
            raise InvalidArgument("export: no image name given")
        opts = ExportOptions(
            platforms=[platforms.Platform(p.os, p.architecture, p.variant) for p in dst.platforms],
            all_platforms=dst.all_platforms,
            skip_docker_manifest=dst.skip_compatibility_manifest,
        )
        sender = DataSender(side)
        try:
            await self._workers.exporter().export(ns, names, opts, sender, report)
        finally:
            await sender.aclose()
            side.close()  # the end of the data stream is the end of the tar

    async def _import(
        self,
        ns: str,
        src: tt.ImageImportStream,
        dst: tt.ImageStore,
        report: Callable[[str, str, int, int], None],
    ) -> None:
        from pyctr.daemon.transfer.archive import receive_data

        side = self._data_stream(ns, src.stream)
        try:
            images = await self._workers.importer().import_(
                ns, receive_data(side), import_options(dst), report
            )
            if not images:
                raise NotFound("import: the archive names no image")
        finally:
            side.close()


def service(ic: plugin.InitContext) -> TransferService:
    db = ic.get(plugin.METADATA)
    content = ic.get(plugin.CONTENT)
    snapshotters = ic.get_by_id(plugin.SERVICE, "snapshots-service")
    differ = ic.get(plugin.DIFF)
    exchange = ic.get(plugin.EVENT)
    config_dir = ic.plugin_config.get("config_path") or None

    def make_puller() -> Puller:
        from pyctr.daemon.remotes.registry import RegistryClient
        from pyctr.daemon.transfer.pull import Puller

        return Puller(
            db=db,
            content=content,
            snapshotters=snapshotters,
            differ=differ,
            exchange=exchange,
            client_factory=functools.partial(RegistryClient, config_dir=config_dir),
        )

    def make_pusher() -> Pusher:
        from pyctr.daemon.remotes.registry import RegistryClient
        from pyctr.daemon.transfer.push import Pusher

        return Pusher(
            db=db, content=content, client_factory=functools.partial(RegistryClient, config_dir=config_dir)
        )

    def make_exporter() -> Exporter:
        from pyctr.daemon.transfer.archive import Exporter

        return Exporter(db=db, content=content)

    def make_importer() -> Importer:
        from pyctr.daemon.transfer.archive import Importer

        return Importer(db=db, content=content, snapshotters=snapshotters, differ=differ, exchange=exchange)

    workers = Workers(puller=make_puller, pusher=make_pusher, exporter=make_exporter, importer=make_importer)
    return TransferService(workers, ic.get_by_id(plugin.INTERNAL, "streaming").manager)
