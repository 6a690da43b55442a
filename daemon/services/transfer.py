"""containerd.services.transfer.v1.Transfer: the daemon moves images itself, reporting progress.

Supported now: a registry (``OCIRegistry``) into the image store (``ImageStore``) — a pull with
unpack. Other source/destination pairs (push, import, export) answer Unimplemented, naming the
pair. Progress goes to the side stream named in the options, as ``containerd.types.transfer.
Progress`` messages; the stream is closed when the transfer ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pyctr.api import namespaces, platforms, typeurl
from pyctr.api._pb.containerd.services.transfer import v1 as pb
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument, NotFound, NotImplementedErr
from pyctr.daemon import plugin
from pyctr.daemon.transfer.streams import SideStream, StreamManager

if TYPE_CHECKING:
    from pyctr.daemon.transfer.pull import Progress, Puller, PullOptions


def _decode(msg: object, what: str) -> object:
    if msg is None:
        raise InvalidArgument(f"transfer {what} must be set")
    try:
        return typeurl.unmarshal(msg.type_url, msg.value)  # type: ignore[attr-defined]
    except KeyError:
        raise NotImplementedErr(f"transfer {what} type {msg.type_url} is not supported") from None  # type: ignore[attr-defined]


def pull_options(dest: tt.ImageStore) -> PullOptions:
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
    )
    if dest.unpacks:
        opts.snapshotter = dest.unpacks[0].snapshotter or "overlayfs"
    return opts


class TransferService(pb.TransferBase):
    def __init__(self, make_puller: Callable[[], Puller], streams: StreamManager) -> None:
        # The registry client (aiohttp) is imported on the first transfer, not at daemon start:
        # it is a quarter of pyctrd's import time and most daemons never pull.
        self._make_puller = make_puller
        self._puller: Puller | None = None
        self.streams = streams

    @property
    def puller(self) -> Puller:
        if self._puller is None:
            self._puller = self._make_puller()
        return self._puller

    async def transfer(self, message: pb.TransferRequest) -> Empty:
        ns = namespaces.required()
        src = _decode(message.source, "source")
        dst = _decode(message.destination, "destination")
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

        try:
            if isinstance(src, tt.OciRegistry) and isinstance(dst, tt.ImageStore):
                await self.puller.pull(ns, src.reference, pull_options(dst), report)
                return Empty()
            raise NotImplementedErr(
                f"transfer from {type(src).__name__} to {type(dst).__name__} is not implemented"
            )
        finally:
            if progress_stream is not None:
                progress_stream.close()


async def _init(ic: plugin.InitContext) -> TransferService:
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
            client_factory=lambda: RegistryClient(config_dir=config_dir),
        )

    return TransferService(make_puller, ic.get_by_id(plugin.INTERNAL, "streaming"))


REGISTRATION = plugin.Registration(
    type=plugin.GRPC,
    id="transfer",
    init=_init,
    requires=(plugin.METADATA, plugin.CONTENT, plugin.SERVICE, plugin.DIFF, plugin.EVENT, plugin.INTERNAL),
    # Where per-registry hosts.toml files live (containerd's registry config_path).
    config={"config_path": "/etc/pyctrd/certs.d"},
)
