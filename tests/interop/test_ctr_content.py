"""``ctr content`` (the real Go ctr 1.6) on pyctrd, compared with what it does on containerd.

Every test runs the same steps against both daemons, in a namespace of its own (containerd is shared
by the whole session). Normalised away: AGE columns, and the version-mismatch warnings ctr prints
when the server is not containerd 1.6.20.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from grpclib.client import Channel

from pyctr.api import digest as digestmod
from pyctr.api._pb.containerd.services.content import v1 as pb
from tests.helpers import daemons

pytestmark = pytest.mark.interop

MISMATCH_WARNINGS = {"WARNING: version mismatch", "WARNING: revision mismatch"}
CONTENT_DIR = "io.containerd.content.v1.content"


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture
def daemons_(pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str) -> dict[str, daemons.Daemon]:
    return {"pyctrd": pyd, "containerd": containerd}


def ctr(
    d: daemons.Daemon, ns: str, *args: str, stdin: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ctr", "-a", d.address, "-n", ns, *args],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )


def out(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode == 0, (r.args, errors(r))
    return r.stdout.decode()


def errors(r: subprocess.CompletedProcess[bytes]) -> str:
    lines = r.stderr.decode(errors="replace").splitlines(True)
    return "".join(line for line in lines if line.strip() not in MISMATCH_WARNINGS)


def ingest(
    d: daemons.Daemon, ns: str, path: str, ref: str, *flags: str
) -> subprocess.CompletedProcess[bytes]:
    with open(path, "rb") as f:
        return ctr(d, ns, "content", "ingest", *flags, ref, stdin=f.fileno())


def table(text: str) -> list[list[str]]:
    """A ctr table (tab-separated cells) without its AGE column, and with LABELS in sorted order
    (ctr prints them in Go's random map order)."""
    rows = [re.split(r"\t+", line.rstrip("\t")) for line in text.splitlines() if line.strip()]
    header = rows[0]
    age = header.index("AGE") if "AGE" in header else None
    lbl = header.index("LABELS") if "LABELS" in header else None
    for row in rows[1:]:
        if lbl is not None and lbl < len(row):
            row[lbl] = ",".join(sorted(row[lbl].split(",")))
    return [[c for i, c in enumerate(row) if i != age] for row in rows]


def blob_path(d: daemons.Daemon, dgst: str) -> str:
    return os.path.join(d.root, CONTENT_DIR, "blobs", "sha256", dgst.split(":")[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_ingest_ls_get_label_rm(daemons_: dict[str, daemons.Daemon], tmp_path: object) -> None:
    big = os.urandom(5 * (1 << 20) + 333)  # several Read chunks
    small = b"small blob\n"
    other = b"other bytes"
    big_p = write_file(f"{tmp_path}/big", big)
    small_p = write_file(f"{tmp_path}/small", small)
    other_p = write_file(f"{tmp_path}/other", other)
    dbig, dsmall = digestmod.of(big), digestmod.of(small)
    seen: dict[str, dict[str, Any]] = {}
    for name, d in daemons_.items():
        ns = unique("content")
        got: dict[str, Any] = {}
        got["plain"] = ingest(d, ns, big_p, "big").returncode
        got["expected"] = ingest(d, ns, small_p, "small", "--expected-digest", dsmall).returncode
        # Already there: WriteBlob treats ALREADY_EXISTS as success.
        got["again"] = ingest(d, ns, small_p, "small-again", "--expected-digest", dsmall).returncode
        wrong = ingest(d, ns, other_p, "wrong", "--expected-digest", digestmod.of(b"absent"))
        got["wrong"] = (wrong.returncode, errors(wrong))
        # A wrong digest that names a blob the namespace has: ALREADY_EXISTS on the first STAT, so
        # ctr succeeds without sending anything.
        got["wrong existing"] = ingest(d, ns, other_p, "wrong2", "--expected-digest", dsmall).returncode
        got["sized"] = ingest(d, ns, other_p, "sized", "--expected-size", "3").returncode
        got["ls"] = table(out(ctr(d, ns, "content", "ls")))
        got["ls -q"] = out(ctr(d, ns, "content", "ls", "-q")).split()
        # containerd lists ingests in Go map order (random): compare the rows sorted.
        active = table(out(ctr(d, ns, "content", "active")))
        got["active"] = active[:1] + sorted(active[1:])
        fetched = ctr(d, ns, "content", "get", dbig)
        assert fetched.returncode == 0 and fetched.stdout == big, f"{name}: get returned other bytes"
        got["get small"] = out(ctr(d, ns, "content", "get", dsmall))
        # ctr prints the labels in Go map order (random): compare them as a set.
        got["label"] = sorted(
            out(ctr(d, ns, "content", "label", dbig, "a=1", "b.c=2", "z=")).strip().split(",")
        )
        got["ls labelled"] = table(out(ctr(d, ns, "content", "ls")))
        got["relabel"] = out(ctr(d, ns, "content", "label", dbig, "b.c="))
        got["ls relabelled"] = table(out(ctr(d, ns, "content", "ls")))
        # Rooted, big survives collections; small goes with its row (when depends on the daemon's
        # GC schedule: pyctrd collects right after a deletion, containerd at its next interval).
        out(ctr(d, ns, "content", "label", dbig, "containerd.io/gc.root=test"))
        got["rm"] = out(ctr(d, ns, "content", "rm", dsmall))
        got["ls after rm"] = out(ctr(d, ns, "content", "ls", "-q")).split()
        out(ctr(d, ns, "leases", "create", "--id", "gc-now"))
        out(ctr(d, ns, "leases", "rm", "--sync", "gc-now"))  # a collection, finished when this returns
        got["ls after gc"] = out(ctr(d, ns, "content", "ls", "-q")).split()
        got["files after gc"] = (os.path.exists(blob_path(d, dbig)), os.path.exists(blob_path(d, dsmall)))
        missing = ctr(d, ns, "content", "get", dsmall)
        got["get removed"] = (missing.returncode, errors(missing))
        got["other ns"] = out(ctr(d, unique("content-empty"), "content", "ls", "-q")).split()
        seen[name] = got

    p, c = seen["pyctrd"], seen["containerd"]
    for key in p:
        assert p[key] == c[key], f"{key}: pyctrd {p[key]!r} != containerd {c[key]!r}"
    # And what that agreement means.
    assert p["plain"] == p["expected"] == p["again"] == p["wrong existing"] == 0
    assert p["wrong"][0] == 1 and "unexpected commit digest" in p["wrong"][1]
    assert p["ls -q"] == sorted([dbig, dsmall])
    assert p["label"] == ["a=1", "b.c=2"] and p["relabel"] == "a=1\n"
    assert [r[-1] for r in p["ls labelled"][1:] if r[0] == dbig] == ["a=1,b.c=2"]
    assert p["rm"] == f"{dsmall}\n"
    assert p["ls after rm"] == p["ls after gc"] == [dbig]
    assert p["files after gc"] == (True, False)
    assert p["get removed"][0] == 1 and "not found" in p["get removed"][1]
    assert p["other ns"] == []
    assert sorted(r[0] for r in p["active"][1:]) == ["sized", "wrong"]


def test_active_lists_an_open_ingest(daemons_: dict[str, daemons.Daemon], tmp_path: object) -> None:
    data = os.urandom(2 * (1 << 20))
    seen = {}
    for name, d in daemons_.items():
        ns = unique("content-active")
        fifo = f"{tmp_path}/{name}.fifo"
        os.mkfifo(fifo)
        # Hold the write end: ctr blocks reading stdin, so its ingest stays open.
        rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        wfd = os.open(fifo, os.O_WRONLY)
        os.set_blocking(rfd, True)
        proc = subprocess.Popen(
            ["ctr", "-a", d.address, "-n", ns, "content", "ingest", "act-ref"],
            stdin=rfd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(rfd)
        try:
            os.write(wfd, data[: 1 << 20])
            deadline = time.monotonic() + 15
            while True:
                rows = table(out(ctr(d, ns, "content", "active")))
                if [r[:2] for r in rows[1:]] == [["act-ref", "1.049MB"]]:
                    break
                assert time.monotonic() < deadline, f"{name}: active shows {rows}"
                time.sleep(0.05)
            filtered = table(out(ctr(d, ns, "content", "active", "ref~=^act-")))
            none = table(out(ctr(d, ns, "content", "active", "ref~=^nothing")))
            pos = 0
            while pos < len(data) - (1 << 20):
                pos += os.write(wfd, data[(1 << 20) + pos :])
        finally:
            os.close(wfd)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        after = table(out(ctr(d, ns, "content", "active")))
        listed = out(ctr(d, ns, "content", "ls", "-q")).split()
        seen[name] = (rows, filtered, none, after, listed)
    assert seen["pyctrd"] == seen["containerd"]
    rows, filtered, none, after, listed = seen["pyctrd"]
    assert rows == [["REF", "SIZE"], ["act-ref", "1.049MB"]] == filtered
    assert none == after == [["REF", "SIZE"]]
    assert listed == [digestmod.of(data)]


async def _leased_write(d: daemons.Daemon, ns: str, lease: str, ref: str, data: bytes) -> str:
    """Content.Write with ``containerd-lease`` metadata (ctr 1.6's ingest has no lease flag)."""
    channel = Channel(path=d.address)
    md = {"containerd-namespace": ns}
    if lease:
        md["containerd-lease"] = lease
    dgst = digestmod.of(data)
    try:
        stub = pb.ContentStub(channel, metadata=md)
        requests = [
            pb.WriteContentRequest(action=pb.WriteAction.STAT, ref=ref, total=len(data), expected=dgst),
            pb.WriteContentRequest(action=pb.WriteAction.WRITE, offset=0, data=data),
            pb.WriteContentRequest(
                action=pb.WriteAction.COMMIT, offset=len(data), total=len(data), expected=dgst
            ),
        ]
        replies = [r async for r in stub.write(requests)]
    finally:
        channel.close()
    assert replies[-1].digest == dgst and replies[-1].offset == len(data), replies
    return dgst


def test_lease_protects_content_from_gc(daemons_: dict[str, daemons.Daemon]) -> None:
    leased = os.urandom(100_000)
    loose = os.urandom(1000)
    seen = {}
    for name, d in daemons_.items():
        ns = unique("content-lease")
        steps: list[object] = []
        out(ctr(d, ns, "leases", "create", "--id", "L"))
        out(ctr(d, ns, "leases", "create", "--id", "other"))
        dl = asyncio.run(_leased_write(d, ns, "L", "leased", leased))
        du = asyncio.run(_leased_write(d, ns, "", "loose", loose))
        steps.append(sorted(out(ctr(d, ns, "content", "ls", "-q")).split()) == sorted([dl, du]))
        # Removing another lease collects the unleased blob, not the leased one.
        steps.append(out(ctr(d, ns, "leases", "rm", "--sync", "other")))
        steps.append(out(ctr(d, ns, "content", "ls", "-q")).split() == [dl])
        steps.append((os.path.exists(blob_path(d, dl)), os.path.exists(blob_path(d, du))))
        steps.append([line.split()[0] for line in out(ctr(d, ns, "leases", "ls")).splitlines()[1:]])
        # Removing the lease itself lets the collector take the blob and its file.
        steps.append(out(ctr(d, ns, "leases", "rm", "--sync", "L")))
        steps.append(out(ctr(d, ns, "content", "ls", "-q")).split())
        steps.append(os.path.exists(blob_path(d, dl)))
        seen[name] = steps
    assert seen["pyctrd"] == seen["containerd"]
    assert seen["pyctrd"] == [True, "other\n", True, (True, False), ["L"], "L\n", [], False]
