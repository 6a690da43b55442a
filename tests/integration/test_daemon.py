"""pyctrd as a process: start-up, sockets, configuration, signals, readiness, crash safety, health."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import time
import tomllib
from collections.abc import Iterator

import pytest
from grpclib.client import Channel

from pyctr.api._pb.containerd.services.events.v1 import SubscribeRequest
from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest, LeasesStub, ListRequest
from pyctr.api._pb.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    ListNamespacesRequest,
    Namespace,
)
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api._pb.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from pyctr.ctr.client import Client
from tests.helpers import daemons


class NotifiedDaemon:
    """A pyctrd started with NOTIFY_SOCKET pointing at a datagram socket the test owns."""

    def __init__(self) -> None:
        self.base = daemons.new_base("pyctrd-")
        self.notify_path = os.path.join(self.base, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(10)
        # root and state do not exist yet: the daemon must create them.
        self.d = daemons.start_pyctrd(self.base, env={"NOTIFY_SOCKET": self.notify_path})

    def close(self) -> None:
        try:
            daemons.cleanup(self.d)
        finally:
            self.notify.close()


@pytest.fixture(scope="module")
def served() -> Iterator[NotifiedDaemon]:
    """One daemon for the tests that only look at it (or try and fail to disturb it)."""
    n = NotifiedDaemon()
    try:
        yield n
    finally:
        n.close()


def call_version(address: str) -> str:
    async def go() -> str:
        with Client(address) as c:
            return (await c.version.version(Empty())).version

    return asyncio.run(go())


def server_uuid(address: str) -> str:
    async def go() -> str:
        with Client(address) as c:
            return (await c.introspection.server(Empty())).uuid

    return asyncio.run(go())


# ------------------------------------------------------------------------------------ start-up, sockets


def test_notify_socket_receives_ready(served: NotifiedDaemon) -> None:
    assert served.notify.recv(4096) == b"READY=1"


def test_creates_root_and_state_with_embedded_defaults(served: NotifiedDaemon) -> None:
    d = served.d
    if os.path.exists("/etc/pyctrd/config.toml"):
        pytest.skip("a system config is installed; this test is about the built-in defaults")
    # No config file was given and none is installed: built-in defaults plus the path flags.
    assert stat.S_IMODE(os.stat(d.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d.state).st_mode) == 0o711
    assert os.listdir(d.root), "plugins keep their data under root"


def test_sockets_are_mode_0660(served: NotifiedDaemon) -> None:
    for path in (served.d.address, served.d.address + ".ttrpc"):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o660, (path, oct(st.st_mode))


def test_health_service_answers_serving(served: NotifiedDaemon) -> None:
    async def go() -> HealthCheckResponseServingStatus:
        channel = Channel(path=served.d.address)
        try:
            return (await HealthStub(channel).check(HealthCheckRequest())).status
        finally:
            channel.close()

    assert asyncio.run(go()) == HealthCheckResponseServingStatus.SERVING


def test_second_daemon_on_same_socket_is_refused(served: NotifiedDaemon) -> None:
    other = daemons.new_base("pyctrd-2nd-")
    try:
        r = daemons.run(
            [
                daemons.PYCTRD,
                "--root",
                os.path.join(other, "root"),
                "--state",
                os.path.join(other, "s"),
                "--address",
                served.d.address,
            ],
            timeout=30,
        )
    finally:
        # Both the socket and its .ttrpc sibling stay untouched.
        assert os.path.exists(served.d.address) and os.path.exists(served.d.address + ".ttrpc")
        shutil.rmtree(other, ignore_errors=True)
    assert r.returncode == 1
    assert f"{served.d.address} is in use by a running server" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert served.d.proc is not None and served.d.proc.poll() is None
    assert call_version(served.d.address)


def test_stale_socket_file_is_replaced() -> None:
    base = daemons.new_base("pyctrd-stale-")
    os.makedirs(os.path.join(base, "s"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(base, "s", "pyctrd.sock"))  # bound, never listening, then gone
    stale.close()
    d = daemons.start_pyctrd(base)
    try:
        assert call_version(d.address)
    finally:
        daemons.cleanup(d)


# ------------------------------------------------------------------------------------------ configuration


def test_config_default_parses_and_is_accepted() -> None:
    r = daemons.run([daemons.PYCTRD, "config", "default"])
    assert r.returncode == 0, r.stderr
    parsed = tomllib.loads(r.stdout)
    assert parsed["version"] == 2 and "grpc" in parsed and "plugins" in parsed

    base = daemons.new_base("pyctrd-cfg-")
    path = os.path.join(base, "config.toml")
    with open(path, "w") as f:
        f.write(r.stdout)
    # The file's paths are the system's; flags point this daemon at the temp dir instead.
    d = daemons.start_pyctrd(base, "--config", path)
    try:
        assert call_version(d.address)
        dump = daemons.run([daemons.PYCTRD, "--config", path, "--root", d.root, "config", "dump"])
        assert dump.returncode == 0, dump.stderr
        assert tomllib.loads(dump.stdout)["root"] == d.root
    finally:
        daemons.cleanup(d)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version = 2\n[grpc\n", "config.toml"),
        ("version = 3\n", "unsupported config version 3"),
        ("version = 2\nbogus = 1\n", "unknown configuration keys: bogus"),
        ('version = 2\n[grpc]\n  uid = "root"\n', "grpc.uid: expected int, got str"),
        ('version = 2\nroot = "relative/root"\n', "must be absolute"),
    ],
    ids=["toml-syntax", "version", "unknown-key", "wrong-type", "relative-root"],
)
def test_invalid_config_is_a_clear_error(text: str, expected: str) -> None:
    base = daemons.new_base("pyctrd-badcfg-")
    try:
        path = os.path.join(base, "config.toml")
        with open(path, "w") as f:
            f.write(text)
        args = ["--config", path, "--state", os.path.join(base, "s"), "--address", f"{base}/s/p.sock"]
        if "root =" not in text:  # a --root flag would override the file's bad root
            args += ["--root", os.path.join(base, "root")]
        r = daemons.run([daemons.PYCTRD, *args], timeout=30)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr.startswith("pyctrd: ") and expected in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not os.path.exists(os.path.join(base, "s")), "nothing is created for a bad config"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -------------------------------------------------------------------------------------------- signals


def test_sigterm_ends_subscribe_streams_and_exits_cleanly(pyctrd: daemons.Daemon) -> None:
    proc = pyctrd.proc
    assert proc is not None

    async def go() -> float:
        with Client(pyctrd.address, "sigterm") as c:
            stream = c.events.subscribe(SubscribeRequest()).__aiter__()
            first = asyncio.ensure_future(stream.__anext__())
            # An event through the stream proves the subscription is live before the signal.
            for i in range(50):
                await c.namespaces.create(CreateNamespaceRequest(namespace=Namespace(name=f"sigterm-{i}")))
                done, _ = await asyncio.wait([first], timeout=0.1)
                if done:
                    break
            assert (await first).topic == "/namespaces/create"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # by the PID we started
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(stream.__anext__(), 5)  # ended by the server, cleanly
            return time.monotonic() - started

    assert asyncio.run(go()) < 5
    assert proc.wait(5) == 0, pyctrd.log()[-3000:]
    assert not os.path.exists(pyctrd.address)
    assert not os.path.exists(pyctrd.address + ".ttrpc")


def test_notify_socket_gone_at_shutdown_is_harmless() -> None:
    n = NotifiedDaemon()
    try:
        assert n.notify.recv(4096) == b"READY=1"
        n.notify.close()
        os.unlink(n.notify_path)  # STOPPING=1 now has nowhere to go
        assert n.d.stop() == 0, n.d.log()[-3000:]
        assert not os.path.exists(n.d.address)
    finally:
        n.close()


def test_metadata_survives_sigkill(pyctrd: daemons.Daemon) -> None:
    before = server_uuid(pyctrd.address)

    async def populate() -> None:
        with Client(pyctrd.address, "crash-a") as c:
            for name, labels in (("crash-a", {"x": "1"}), ("crash-b", {}), ("crash-c", {"y": "2", "z": "3"})):
                await c.namespaces.create(
                    CreateNamespaceRequest(namespace=Namespace(name=name, labels=labels))
                )
            await c.leases.create(CreateRequest(id="held-1", labels={"k": "v"}))
            await c.leases.create(CreateRequest(id="held-2"))
            await c.stub(LeasesStub, "crash-b").create(CreateRequest(id="held-3"))

    asyncio.run(populate())
    pyctrd.kill()  # SIGKILL by the PID we started: no shutdown code runs
    assert os.path.exists(pyctrd.address), "a killed daemon leaves its socket behind"
    daemons.restart(pyctrd)

    async def read() -> tuple[dict[str, dict[str, str]], dict[str, list[tuple[str, dict[str, str]]]]]:
        with Client(pyctrd.address, "crash-a") as c:
            nss = (await c.namespaces.list(ListNamespacesRequest())).namespaces
            leases = {}
            for ns in ("crash-a", "crash-b"):
                found = (await c.stub(LeasesStub, ns).list(ListRequest())).leases
                leases[ns] = sorted((le.id, dict(le.labels)) for le in found)
            return {n.name: dict(n.labels) for n in nss}, leases

    nss, leases = asyncio.run(read())
    assert {"crash-a": {"x": "1"}, "crash-b": {}, "crash-c": {"y": "2", "z": "3"}}.items() <= nss.items()
    assert leases == {"crash-a": [("held-1", {"k": "v"}), ("held-2", {})], "crash-b": [("held-3", {})]}
    assert server_uuid(pyctrd.address) == before
