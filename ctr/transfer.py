"""Pull and push through the daemon's Transfer service, on the lean client (no asyncio, no grpclib,
no generated code: a pull of a small image is over before those would have been imported).

One connection carries three calls::

    Streaming.Stream   "progress-<pid>-<ns>"  StreamInit, then the daemon's Progress messages
    Streaming.Stream   "auth-<pid>-<ns>"      only when there are credentials to offer: the daemon's
                                              AuthRequests, our AuthResponses (pyctr.ctr.credentials)
    Transfer.Transfer  the request naming both streams; its reply ends the transfer

Both side streams are opened first, and each is acknowledged (an empty first message) before the
transfer names it. The daemon closes them when the transfer ends, so after a successful reply we
read on until they close: the last progress lines arrive first. Messages are encoded by field
number (pyctr.api.pblite) from containerd's protos: types/transfer/{registry,imagestore,progress}
.proto, services/transfer/v1 and services/streaming/v1; ``tests/unit/test_ctr_transfer.py`` checks
the bytes against the generated classes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable

from pyctr.api import pblite
from pyctr.api.errdefs import ContainerdError
from pyctr.api.grpclite import Call, Channel
from pyctr.ctr import output
from pyctr.ctr.credentials import CredentialSource

# Plain classes and tuples here, not dataclasses: importing dataclasses (inspect, ast, dis) would
# cost a small pull more than everything else it does on this side.

STREAM = "/containerd.services.streaming.v1.Streaming/Stream"
TRANSFER = "/containerd.services.transfer.v1.Transfer/Transfer"
NAMESPACE_HEADER = "containerd-namespace"
_PREFIX = "type.googleapis.com/"
# Bare type names, as containerd's typeurl (and pyctr.api.typeurl) writes them.
T_STREAM_INIT = "containerd.services.streaming.v1.StreamInit"
T_OCI_REGISTRY = "containerd.types.transfer.OCIRegistry"
T_IMAGE_STORE = "containerd.types.transfer.ImageStore"
T_PROGRESS = "containerd.types.transfer.Progress"
T_AUTH_REQUEST = "containerd.types.transfer.AuthRequest"
T_AUTH_RESPONSE = "containerd.types.transfer.AuthResponse"
# containerd.types.transfer.AuthType
AUTH_NONE, AUTH_CREDENTIALS, AUTH_REFRESH = 0, 1, 2
ACK_TIMEOUT = 10.0  # for a side stream's acknowledgement
CLOSE_TIMEOUT = 10.0  # for the side streams to close after the transfer's reply


# -- messages --------------------------------------------------------------------------------------


# (os, architecture, variant), as pyctr.api.platforms.Platform holds them.
PlatformTuple = tuple[str, str, str]


# uname's machine names as OCI architectures: pyctr.api.platforms' table, which a unit test keeps
# this one equal to (that module's dataclass would pull dataclasses into every pull).
_ARCH = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
}


def host_platform() -> PlatformTuple:
    """``pyctr.api.platforms.default()`` as a tuple."""
    machine = os.uname().machine
    return ("linux", _ARCH.get(machine, machine), "")


def parse_platform(text: str) -> PlatformTuple:
    """``--platform os/arch[/variant]``, parsed and normalised by pyctr.api.platforms."""
    from pyctr.api import platforms

    p = platforms.parse(text)
    return (p.os, p.architecture, p.variant)


def platform(p: PlatformTuple) -> bytes:
    """containerd.types.Platform {os = 1, architecture = 2, variant = 3}."""
    return pblite.string(1, p[0]) + pblite.string(2, p[1]) + pblite.string(3, p[2])


def image_store(
    name: str = "",
    labels: dict[str, str] | None = None,
    platforms: Iterable[PlatformTuple] = (),
    all_metadata: bool = False,
    unpacks: Iterable[tuple[PlatformTuple, str]] = (),
) -> bytes:
    """containerd.types.transfer.ImageStore (the fields pull and push use): name = 1, labels = 2,
    platforms = 3, all_metadata = 4, unpacks = 10 {platform = 1, snapshotter = 2}."""
    return (
        pblite.string(1, name)
        + pblite.string_map(2, labels or {})
        + pblite.repeated(3, (platform(p) for p in platforms))
        + pblite.uint(4, int(all_metadata))
        + pblite.repeated(10, (pblite.message(1, platform(p)) + pblite.string(2, s) for p, s in unpacks))
    )


def oci_registry(reference: str, auth_stream: str = "") -> bytes:
    """containerd.types.transfer.OCIRegistry {reference = 1, resolver = 2 {auth_stream = 1}}."""
    return pblite.string(1, reference) + pblite.message(2, pblite.string(1, auth_stream))


def transfer_request(source: bytes, destination: bytes, progress_stream: str) -> bytes:
    """TransferRequest {source = 1, destination = 2 (Anys), options = 3 {progress_stream = 1}}."""
    return (
        pblite.message(1, source)
        + pblite.message(2, destination)
        + pblite.message(3, pblite.string(1, progress_stream))
    )


def stream_init(stream_id: str) -> bytes:
    return pblite.any_(T_STREAM_INIT, pblite.string(1, stream_id))


def auth_response(auth_type: int, secret: str = "", username: str = "") -> bytes:
    """AuthResponse {authType = 1, secret = 2, username = 3}, in an Any."""
    body = pblite.uint(1, auth_type) + pblite.string(2, secret) + pblite.string(3, username)
    return pblite.any_(T_AUTH_RESPONSE, body)


class Progress:
    """containerd.types.transfer.Progress {event = 1, name = 2, parents = 3, progress = 4, total = 5}."""

    __slots__ = ("event", "name", "parents", "progress", "total")

    def __init__(
        self,
        event: str = "",
        name: str = "",
        parents: list[str] | None = None,
        progress: int = 0,
        total: int = 0,
    ) -> None:
        self.event = event
        self.name = name
        self.parents = parents if parents is not None else []
        self.progress = progress
        self.total = total

    @classmethod
    def decode(cls, data: bytes) -> Progress:
        p = cls()
        for number, value in pblite.fields(data):
            if number == 1 and isinstance(value, bytes):
                p.event = value.decode()
            elif number == 2 and isinstance(value, bytes):
                p.name = value.decode()
            elif number == 3 and isinstance(value, bytes):
                p.parents.append(value.decode())
            elif number == 4 and isinstance(value, int):
                p.progress = pblite.signed(value)
            elif number == 5 and isinstance(value, int):
                p.total = pblite.signed(value)
        return p


def auth_request_host(data: bytes) -> str:
    """AuthRequest {host = 1, reference = 2, wwwauthenticate = 3}: the host asked about."""
    return next((v.decode() for n, v in pblite.fields(data) if n == 1 and isinstance(v, bytes)), "")


def unpack_any(data: bytes) -> tuple[str, bytes]:
    """An Any's bare type name and value."""
    url, value = pblite.unpack_any(data)
    return url.removeprefix(_PREFIX), value


# -- the view --------------------------------------------------------------------------------------

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

    def update(self, p: Progress) -> None:
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


# -- the transfer ----------------------------------------------------------------------------------


class SideStream:
    """Our end of a Streaming.Stream, registered under ``<prefix>-<pid>-<time>``."""

    def __init__(self, channel: Channel, metadata: dict[str, str], prefix: str) -> None:
        self.id = f"{prefix}-{os.getpid()}-{time.time_ns()}"
        self.call: Call = channel.call(STREAM, metadata)
        self.call.send(stream_init(self.id))
        self.acked = False

    def ready(self) -> bool:
        """Acknowledged (the ack is consumed here), or refused."""
        if not self.acked and self.call.messages:
            self.call.messages.popleft()
            self.acked = True
        return self.acked or self.call.done

    def check_acked(self) -> None:
        if not self.acked:
            self.call.check()
            raise ContainerdError(f"stream {self.id} closed before it was acknowledged")


def registry_transfer(
    address: str,
    namespace: str,
    timeout: float | None,
    creds: CredentialSource,
    view: ProgressView,
    build: Callable[[str], tuple[bytes, bytes]],
) -> None:
    """Run one registry transfer; ``build(auth_stream_id)`` gives its source and destination Anys."""
    md = {NAMESPACE_HEADER: namespace}
    with Channel(address, timeout) as channel:
        progress = SideStream(channel, md, "progress")
        auth = SideStream(channel, md, "auth") if not creds.empty else None
        sides = [s for s in (progress, auth) if s is not None]
        channel.wait(lambda: all(s.ready() for s in sides), timeout or ACK_TIMEOUT)
        for s in sides:
            s.check_acked()
        source, destination = build(auth.id if auth is not None else "")
        call = channel.unary(TRANSFER, transfer_request(source, destination, progress.id), md)

        def serve() -> bool:
            _show(progress.call, view)
            if auth is not None:
                _answer(auth.call, creds)
            return call.done

        channel.wait(serve)
        call.check()
        # The daemon closes its side streams when the transfer ends: the last progress arrives first.
        try:
            channel.wait(lambda: serve() and all(s.call.done for s in sides), CLOSE_TIMEOUT)
        except TimeoutError:
            pass  # the transfer is done; only its last progress lines are missing


def _show(call: Call, view: ProgressView) -> None:
    while call.messages:
        kind, value = unpack_any(call.messages.popleft())
        if kind == T_PROGRESS:
            view.update(Progress.decode(value))


def _answer(call: Call, creds: CredentialSource) -> None:
    while call.messages:
        kind, value = unpack_any(call.messages.popleft())
        if kind != T_AUTH_REQUEST:
            continue  # unknown message types are ignored, as containerd does
        host = auth_request_host(value)
        try:
            found = creds.lookup(host)
        except ContainerdError as e:
            # A broken entry or helper: said once, and the daemon goes on without credentials.
            print(f"pyctr: credentials for {host}: {e}", file=sys.stderr)
            found = None
        if found is None:
            call.send(auth_response(AUTH_NONE))
        elif not found.username:
            call.send(auth_response(AUTH_REFRESH, secret=found.secret))
        else:
            call.send(auth_response(AUTH_CREDENTIALS, secret=found.secret, username=found.username))
