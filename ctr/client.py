"""A small client for pyctrd (or containerd): one channel, the namespace on every call.

Errors come back as our categorised errors (``errdefs.from_status``), so commands can print them
the way ``ctr`` does.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from pyctr.api import errdefs, namespaces

if TYPE_CHECKING:  # the stubs are imported by the property that returns one
    from pyctr.api._pb.containerd.services.containers.v1 import ContainersStub
    from pyctr.api._pb.containerd.services.content.v1 import ContentStub
    from pyctr.api._pb.containerd.services.diff.v1 import DiffStub
    from pyctr.api._pb.containerd.services.events.v1 import EventsStub
    from pyctr.api._pb.containerd.services.images.v1 import ImagesStub
    from pyctr.api._pb.containerd.services.introspection.v1 import IntrospectionStub
    from pyctr.api._pb.containerd.services.leases.v1 import LeasesStub
    from pyctr.api._pb.containerd.services.namespaces.v1 import NamespacesStub
    from pyctr.api._pb.containerd.services.snapshots.v1 import SnapshotsStub
    from pyctr.api._pb.containerd.services.streaming.v1 import StreamingStub
    from pyctr.api._pb.containerd.services.tasks.v1 import TasksStub
    from pyctr.api._pb.containerd.services.transfer.v1 import TransferStub
    from pyctr.api._pb.containerd.services.version.v1 import VersionStub

S = TypeVar("S")
T = TypeVar("T")


class Client:
    def __init__(
        self, address: str, namespace: str = namespaces.DEFAULT, timeout: float | None = None
    ) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self.timeout = timeout
        self.lease = ""  # sent with every call when set (containerd's WithLease)
        from grpclib.client import Channel  # here: translate() needs none of it

        self.channel = Channel(path=self.address)

    def stub(self, cls: type[S], namespace: str | None = None) -> S:
        md = {namespaces.GRPC_HEADER: self.namespace if namespace is None else namespace}
        if self.lease:
            md[namespaces.LEASE_HEADER] = self.lease
        return cls(self.channel, timeout=self.timeout, metadata=md)  # type: ignore[call-arg]

    @property
    def version(self) -> VersionStub:
        from pyctr.api._pb.containerd.services.version.v1 import VersionStub

        return self.stub(VersionStub)

    @property
    def namespaces(self) -> NamespacesStub:
        from pyctr.api._pb.containerd.services.namespaces.v1 import NamespacesStub

        return self.stub(NamespacesStub)

    @property
    def introspection(self) -> IntrospectionStub:
        from pyctr.api._pb.containerd.services.introspection.v1 import IntrospectionStub

        return self.stub(IntrospectionStub)

    @property
    def leases(self) -> LeasesStub:
        from pyctr.api._pb.containerd.services.leases.v1 import LeasesStub

        return self.stub(LeasesStub)

    @property
    def content(self) -> ContentStub:
        from pyctr.api._pb.containerd.services.content.v1 import ContentStub

        return self.stub(ContentStub)

    @property
    def snapshots(self) -> SnapshotsStub:
        from pyctr.api._pb.containerd.services.snapshots.v1 import SnapshotsStub

        return self.stub(SnapshotsStub)

    @property
    def containers(self) -> ContainersStub:
        from pyctr.api._pb.containerd.services.containers.v1 import ContainersStub

        return self.stub(ContainersStub)

    @property
    def tasks(self) -> TasksStub:
        from pyctr.api._pb.containerd.services.tasks.v1 import TasksStub

        return self.stub(TasksStub)

    @property
    def diff(self) -> DiffStub:
        from pyctr.api._pb.containerd.services.diff.v1 import DiffStub

        return self.stub(DiffStub)

    @property
    def images(self) -> ImagesStub:
        from pyctr.api._pb.containerd.services.images.v1 import ImagesStub

        return self.stub(ImagesStub)

    @property
    def transfer(self) -> TransferStub:
        from pyctr.api._pb.containerd.services.transfer.v1 import TransferStub

        return self.stub(TransferStub)

    @property
    def streaming(self) -> StreamingStub:
        from pyctr.api._pb.containerd.services.streaming.v1 import StreamingStub

        return self.stub(StreamingStub)

    @property
    def events(self) -> EventsStub:
        from pyctr.api._pb.containerd.services.events.v1 import EventsStub

        return self.stub(EventsStub)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def translate(exc: BaseException, address: str) -> BaseException:
    """Turn transport and status errors into the errors users should read.

    Not only for this client's errors: the lean client's (pyctr.api.grpclite) come here too, and
    grpclib is imported only when the error is one of its own."""
    if type(exc).__module__.startswith("grpclib"):
        from grpclib.exceptions import GRPCError, StreamTerminatedError
    else:
        GRPCError = StreamTerminatedError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, GRPCError):
        return errdefs.from_status(int(exc.status.value), exc.message or "")
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return errdefs.Unavailable(f'failed to dial "{address}": {exc.strerror or exc}')
    if isinstance(exc, StreamTerminatedError):
        return errdefs.Unavailable(f"connection to {address} lost: {exc}")
    if isinstance(exc, TimeoutError):
        return errdefs.DeadlineExceeded(f"call to {address} timed out")
    return exc


async def rpc(client: Client, call: Awaitable[T]) -> T:
    """Await a call, its status (or a transport failure) turned into our categorised errors so
    callers can catch them."""
    try:
        return await call
    except Exception as exc:
        translated = translate(exc, client.address)
        if translated is exc:
            raise
        raise translated from None
