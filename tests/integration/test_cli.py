"""``pyctr``, the console script, against a real pyctrd: tables, ``--format json``, events, errors."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from pyctr.api._pb.containerd.services.namespaces.v1 import CreateNamespaceRequest, Namespace
from pyctr.api._pb.google.protobuf import Empty
from pyctr.ctr.client import Client
from tests.helpers import daemons
from tests.helpers.streams import LineReader, log_records, stop_process, wait_for

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
GO_TIME_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \+0000 UTC"


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


def pyctr(d: daemons.Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return daemons.run([daemons.PYCTR, "-a", d.address, *args], timeout=30)


def ok(d: daemons.Daemon, *args: str) -> str:
    r = pyctr(d, *args)
    assert (r.returncode, r.stderr) == (0, ""), (args, r)
    return r.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and row cells (cells split on runs of spaces)."""
    lines = out.splitlines()
    return lines[0].split(), [r.split() for r in lines[1:] if r.strip()]


def by_first(rows: list[list[str]]) -> dict[str, list[str]]:
    return {r[0]: r for r in rows}


def test_version(pyd: daemons.Daemon) -> None:
    out = ok(pyd, "version")
    assert re.fullmatch(
        r"Client:\n  Version:  \S+\n  Revision: \S+\n  Python version: \S+\n\n"
        rf"Server:\n  Version:  \S+\n  Revision: \S+\n  UUID: ({UUID_RE})\n",
        out,
    ), out

    async def server_uuid() -> str:
        with Client(pyd.address) as c:
            return (await c.introspection.server(Empty())).uuid

    server = json.loads(ok(pyd, "version", "--format", "json"))["server"]
    assert server["uuid"] == asyncio.run(server_uuid()) and server["uuid"] in out


def test_namespaces(pyd: daemons.Daemon) -> None:
    name = unique("cli-ns")
    try:
        assert ok(pyd, "namespaces", "create", name, "a=b", "c=d") == ""
        header, rows = table(ok(pyd, "namespaces", "ls"))
        assert header == ["NAME", "LABELS"] and by_first(rows)[name] == [name, "a=b,c=d"]

        assert ok(pyd, "namespaces", "label", name, "a=", "e=f") == ""
        listed = {n["name"]: n["labels"] for n in json.loads(ok(pyd, "namespaces", "ls", "--format", "json"))}
        assert listed[name] == {"c": "d", "e": "f"}
        assert name in ok(pyd, "ns", "ls", "-q").splitlines()

        assert ok(pyd, "namespaces", "rm", name) == f"{name}\n"
        r = pyctr(pyd, "namespaces", "rm", name)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == f'pyctr: unable to delete {name}: namespace "{name}": not found\n'
    finally:
        pyctr(pyd, "namespaces", "rm", name)


def test_plugins(pyd: daemons.Daemon) -> None:
    header, rows = table(ok(pyd, "plugins", "ls"))
    assert header == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    plugins = json.loads(ok(pyd, "plugins", "ls", "--format", "json"))
    assert {(p["type"], p["id"]) for p in plugins} >= {
        ("io.containerd.grpc.v1", "namespaces"),
        ("io.containerd.grpc.v1", "leases"),
        ("io.containerd.grpc.v1", "introspection"),
        ("io.containerd.event.v1", "exchange"),
    }
    assert all(p["status"] in ("ok", "skip") for p in plugins), plugins
    # Rows are keyed by type here; the table and the JSON say the same thing.
    assert {(r[0], r[1], r[3]) for r in rows} == {(p["type"], p["id"], p["status"]) for p in plugins}
    assert ok(pyd, "plugins", "ls", "-q").splitlines() == [p["id"] for p in plugins]
    grpc = ok(pyd, "plugins", "ls", "-q", "type==io.containerd.grpc.v1").split()
    assert grpc == [p["id"] for p in plugins if p["type"] == "io.containerd.grpc.v1"]


def test_leases(pyd: daemons.Daemon) -> None:
    ns = unique("cli-leases")
    lease = unique("lease")
    try:
        assert ok(pyd, "-n", ns, "leases", "create", "--id", lease, "k=v") == f"{lease}\n"
        leases = {le["id"]: le for le in json.loads(ok(pyd, "-n", ns, "leases", "ls", "--format", "json"))}
        assert set(leases) == {lease}
        labels = leases[lease]["labels"]
        assert labels["k"] == "v"
        # The default expiry is 24 hours from now, as ctr sets it.
        expiry = datetime.datetime.strptime(labels["containerd.io/gc.expire"], "%Y-%m-%dT%H:%M:%S%z")
        in_a_day = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=24)
        assert abs((expiry - in_a_day).total_seconds()) < 600
        datetime.datetime.fromisoformat(leases[lease]["created_at"].replace("Z", "+00:00"))

        header, rows = table(ok(pyd, "-n", ns, "leases", "ls"))
        assert header == ["ID", "CREATED", "AT", "LABELS"]
        assert by_first(rows)[lease][2] == f"containerd.io/gc.expire={labels['containerd.io/gc.expire']},k=v"

        assert ok(pyd, "-n", ns, "leases", "rm", lease) == f"{lease}\n"
        r = pyctr(pyd, "-n", ns, "leases", "rm", lease)
        assert (r.returncode, r.stderr) == (1, f'pyctr: lease "{lease}": not found\n')
    finally:
        pyctr(pyd, "namespaces", "rm", ns)


def subscribers(d: daemons.Daemon) -> int:
    count = 0
    for rec in log_records(d.log_path):
        if rec.get("event") in ("event subscriber added", "event subscriber removed"):
            count = int(rec["subscribers"])
    return count


def test_events_streams_a_namespace_create(pyd: daemons.Daemon) -> None:
    name = unique("cli-ev")
    before = subscribers(pyd)
    proc = subprocess.Popen(
        [daemons.PYCTR, "-a", pyd.address, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: subscribers(pyd) > before, 15)  # the stream is open on the daemon's side

        async def create() -> None:
            with Client(pyd.address, "default") as c:
                await c.namespaces.create(CreateNamespaceRequest(namespace=Namespace(name=name)))

        asyncio.run(create())
        line = LineReader(proc).read_until(lambda s: name in s, timeout=10)
        assert line is not None, "pyctr events printed nothing"
        assert re.fullmatch(rf'{GO_TIME_RE} default /namespaces/create \{{"name":"{name}"\}}', line), line
    finally:
        stop_process(proc)
        pyctr(pyd, "namespaces", "rm", name)


def test_dead_socket_is_a_clear_dial_error() -> None:
    base = daemons.new_base("pyctr-dead-")
    try:
        stale = os.path.join(base, "dead.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(stale)  # a socket file nobody listens on
        for address in (stale, os.path.join(base, "missing.sock")):
            r = daemons.run([daemons.PYCTR, "-a", address, "version"], timeout=30)
            assert r.returncode == 1, r
            assert r.stderr.startswith(f'pyctr: failed to dial "{address}": '), r.stderr
            assert "Traceback" not in r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
