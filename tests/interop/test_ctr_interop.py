"""The real Go ``ctr`` against pyctrd, each output compared with what it prints against containerd.

Normalised away, because they legitimately differ: uuids, timestamps, version strings, generated
lease ids, column padding that depends on other rows, and the ``WARNING: version mismatch`` lines
ctr prints on stderr when the server is not containerd 1.6.20.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import daemons
from tests.helpers.streams import LineReader, stop_process

pytestmark = pytest.mark.interop

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RFC3339_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")
GO_TIME_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \+0000 UTC"
GENERATED_LEASE_RE = re.compile(r"^\d+-[A-Za-z0-9_-]{4}$")
MISMATCH_WARNINGS = {"WARNING: version mismatch", "WARNING: revision mismatch"}
# gRPC plugin ids of services containerd 1.7 added; the reference containerd here is 1.6.
CONTAINERD_17_GRPC = {"streaming", "transfer", "sandboxes", "sandbox-controllers"}


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    """One pyctrd for the module: tests use their own namespaces and names, so they do not interfere."""
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture
def both(pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str) -> Ctr:
    return Ctr(ctr_bin, pyd, containerd)


class Ctr:
    """Runs the same ctr command against pyctrd and containerd."""

    def __init__(self, exe: str, pyd: daemons.Daemon, ref: daemons.Daemon) -> None:
        self.exe = exe
        self.pyd = pyd
        self.ref = ref

    def cmd(self, d: daemons.Daemon, *args: str) -> list[str]:
        return [self.exe, "-a", d.address, *args]

    def one(self, d: daemons.Daemon, *args: str) -> subprocess.CompletedProcess[str]:
        return daemons.run(self.cmd(d, *args), timeout=20)

    def __call__(
        self, *args: str
    ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        return self.one(self.pyd, *args), self.one(self.ref, *args)

    def same(self, *args: str) -> tuple[str, str]:
        """Run on both; stdout, stderr (warnings aside) and exit code must be equal. Returns the stdouts."""
        p, c = self(*args)
        assert (p.returncode, stderr_of(p)) == (c.returncode, stderr_of(c)), (args, p, c)
        assert p.stdout == c.stdout, (args, p.stdout, c.stdout)
        return p.stdout, c.stdout


def stderr_of(r: subprocess.CompletedProcess[str]) -> str:
    return "".join(line for line in r.stderr.splitlines(True) if line.strip() not in MISMATCH_WARNINGS)


def cells(line: str) -> list[str]:
    return line.split()


def rows_for(out: str, names: set[str]) -> dict[str, list[str]]:
    """Table rows whose first cell is one of ``names``, split into cells (padding depends on others)."""
    return {c[0]: c for c in map(cells, out.splitlines()[1:]) if c and c[0] in names}


def column_starts(header: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------- version


def test_version_has_containerds_structure(both: Ctr) -> None:
    p, c = both("version")
    assert p.returncode == c.returncode == 0
    assert stderr_of(p) == stderr_of(c) == ""
    # Only the version mismatch warnings may be extra, and ctr prints them for any non-1.6.20 server.
    assert set(p.stderr.splitlines()) <= MISMATCH_WARNINGS

    def shape(out: str) -> list[str]:
        """The client section as is; the server's values (version, revision, uuid) blanked."""
        lines = out.splitlines()
        server = lines.index("Server:")
        return lines[:server] + [re.sub(r"^(  \w+:\s+).*$", r"\1<v>", line) for line in lines[server:]]

    assert shape(p.stdout) == shape(c.stdout)
    assert shape(p.stdout) == [
        *p.stdout.splitlines()[:5],
        "Server:",
        "  Version:  <v>",
        "  Revision: <v>",
        "  UUID: <v>",
    ]
    assert re.search(rf"^  UUID: {UUID_RE.pattern}$", p.stdout, re.M)


def test_version_uuid_is_stable_across_restart(pyctrd: daemons.Daemon, ctr_bin: str) -> None:
    def server_uuid() -> str:
        r = daemons.run([ctr_bin, "-a", pyctrd.address, "version"])
        assert r.returncode == 0, r.stderr
        m = UUID_RE.search(r.stdout.split("Server:")[1])
        assert m, r.stdout
        return m.group(0)

    first = server_uuid()
    assert pyctrd.stop() == 0
    daemons.restart(pyctrd)
    assert server_uuid() == first


# ------------------------------------------------------------------------------------------ namespaces


def test_namespaces_create_ls_label_rm(both: Ctr) -> None:
    n1, n2 = unique("ns-a"), unique("ns-b")
    try:
        both.same("namespaces", "create", n1, "a=b", "c=d")
        both.same("namespaces", "create", n2)

        p, c = both("namespaces", "ls")
        assert p.returncode == c.returncode == 0
        assert cells(p.stdout.splitlines()[0]) == cells(c.stdout.splitlines()[0]) == ["NAME", "LABELS"]
        expected = {n1: [n1, "a=b,c=d"], n2: [n2]}
        assert rows_for(p.stdout, {n1, n2}) == rows_for(c.stdout, {n1, n2}) == expected

        p, c = both("namespaces", "ls", "-q")
        assert p.returncode == c.returncode == 0
        assert {n1, n2} <= set(p.stdout.split()) and {n1, n2} <= set(c.stdout.split())
        assert set(p.stdout.splitlines()) == set(p.stdout.split())  # one bare name per line

        # "a=" clears a, "e=f" adds e; labels print sorted and comma-joined.
        both.same("namespaces", "label", n1, "a=", "e=f")
        p, c = both("namespaces", "ls")
        assert rows_for(p.stdout, {n1}) == rows_for(c.stdout, {n1}) == {n1: [n1, "c=d,e=f"]}

        out, _ = both.same("namespaces", "rm", n1, n2)
        assert out == f"{n1}\n{n2}\n"
        p, c = both("namespaces", "ls", "-q")
        assert not {n1, n2} & set(p.stdout.split()) and not {n1, n2} & set(c.stdout.split())
    finally:
        both("namespaces", "rm", n1, n2)


def test_namespaces_rm_missing_matches_containerd(both: Ctr) -> None:
    # ctr 1.6 ignores NotFound here (it prints the name and exits 0); both servers must say NotFound.
    missing = unique("ns-missing")
    both.same("namespaces", "rm", missing)


def test_namespaces_create_existing_and_invalid_fail_the_same(both: Ctr) -> None:
    name = unique("ns-dup")
    try:
        both.same("namespaces", "create", name)
        both.same("namespaces", "create", name)
        p, _ = both("namespaces", "create", name)
        assert p.returncode == 1
        assert stderr_of(p) == f'ctr: namespace "{name}": already exists\n'

        both.same("namespaces", "create", "bad!")
        p, _ = both("namespaces", "create", "bad!")
        assert p.returncode == 1 and stderr_of(p).endswith(": invalid argument\n")
    finally:
        both("namespaces", "rm", name)


# --------------------------------------------------------------------------------------------- plugins


def test_plugins_ls_format_and_status(both: Ctr) -> None:
    p, c = both("plugins", "ls")
    assert p.returncode == c.returncode == 0
    assert stderr_of(p) == stderr_of(c) == ""
    for out in (p.stdout, c.stdout):
        lines = out.splitlines()
        assert cells(lines[0]) == ["TYPE", "ID", "PLATFORMS", "STATUS"]
        starts = column_starts(lines[0])
        for line in lines[1:]:
            row = cells(line)
            assert len(row) == 4, line
            # tabwriter: every cell starts where its header does.
            assert [line.index(cell, start) for cell, start in zip(row, starts, strict=True)] == starts
            assert re.fullmatch(r"io\.containerd\.[a-z]+\.v\d", row[0]), line
            assert row[3] in ("ok", "skip", "error"), line

    rows = [cells(line) for line in p.stdout.splitlines()[1:]]
    for type_, id_, _, status in rows:
        # Snapshotters may legitimately skip on some filesystems; nothing else may fail to load.
        assert status == "ok" or (status == "skip" and type_ == "io.containerd.snapshotter.v1"), (type_, id_)
    grpc = {id_ for type_, id_, _, _ in rows if type_ == "io.containerd.grpc.v1"}
    assert {"version", "namespaces", "events", "leases", "introspection", "healthcheck"} <= grpc


def test_plugins_ls_filter_and_quiet(both: Ctr) -> None:
    p, c = both("plugins", "ls", "type==io.containerd.grpc.v1")
    assert p.returncode == c.returncode == 0
    ids = {}
    for name, out in (("pyctrd", p.stdout), ("containerd", c.stdout)):
        lines = out.splitlines()
        assert cells(lines[0]) == ["TYPE", "ID", "PLATFORMS", "STATUS"]
        rows = [cells(line) for line in lines[1:]]
        assert rows and all(r[0] == "io.containerd.grpc.v1" for r in rows), (name, out)
        ids[name] = {r[1] for r in rows}
    # Our gRPC plugins carry containerd's ids (services that only containerd 1.7 has aside).
    assert ids["pyctrd"] - CONTAINERD_17_GRPC <= ids["containerd"]

    full, _ = both("plugins", "ls")
    q, cq = both("plugins", "ls", "-q")
    assert q.returncode == cq.returncode == 0
    assert q.stdout.splitlines() == [cells(line)[1] for line in full.stdout.splitlines()[1:]]

    qf, _ = both("plugins", "ls", "-q", "type==io.containerd.grpc.v1")
    assert set(qf.stdout.split()) == ids["pyctrd"]


# ---------------------------------------------------------------------------------------------- leases


def test_leases_create_ls_rm(both: Ctr) -> None:
    ns = unique("ns-leases")
    lease = unique("lease")
    try:
        out, _ = both.same("-n", ns, "leases", "create", "--id", lease, "k=v")
        assert out == f"{lease}\n"
        p, c = both("-n", ns, "leases", "create")
        assert p.returncode == c.returncode == 0
        generated = {"pyctrd": p.stdout.strip(), "containerd": c.stdout.strip()}
        assert all(GENERATED_LEASE_RE.match(v) for v in generated.values()), generated

        def table(out: str) -> list[list[str]]:
            out = RFC3339_RE.sub("<time>", out)
            for g in generated.values():
                out = out.replace(g, "<generated>")
            return sorted(map(cells, out.splitlines()[1:]))

        p, c = both("-n", ns, "leases", "ls")
        assert p.returncode == c.returncode == 0
        assert cells(p.stdout.splitlines()[0]) == ["ID", "CREATED", "AT", "LABELS"]
        assert p.stdout.splitlines()[0].rstrip() == c.stdout.splitlines()[0].rstrip()
        assert table(p.stdout) == table(c.stdout)
        assert [lease, "<time>", "containerd.io/gc.expire=<time>,k=v"] in table(p.stdout)

        # With one row the padding is the same on both: compare the text itself.
        p, c = both("-n", ns, "leases", "ls", f"id=={lease}")
        assert p.returncode == c.returncode == 0
        assert RFC3339_RE.sub("<t>", p.stdout) == RFC3339_RE.sub("<t>", c.stdout)
        assert len(p.stdout.splitlines()) == 2

        p, c = both("-n", ns, "leases", "ls", "-q")
        assert sorted(p.stdout.split()) == sorted([lease, generated["pyctrd"]])
        assert sorted(c.stdout.split()) == sorted([lease, generated["containerd"]])

        out, _ = both.same("-n", ns, "leases", "rm", lease)
        assert out == f"{lease}\n"
        both.same("-n", ns, "leases", "rm", lease)
        p, _ = both("-n", ns, "leases", "rm", lease)
        assert (p.returncode, stderr_of(p)) == (1, f'ctr: lease "{lease}": not found\n')

        both.same("-n", ns, "leases", "create", "--id", lease)
        both.same("-n", ns, "leases", "create", "--id", lease)  # already exists, same text
    finally:
        # Leases go with their namespace, on both servers.
        both("namespaces", "rm", ns)


# ---------------------------------------------------------------------------------------------- events


def first_create_event(both: Ctr, d: daemons.Daemon, prefix: str) -> tuple[str, str]:
    """Start ``ctr events``, create namespaces until one shows up; returns (line, created name)."""
    proc = subprocess.Popen(
        both.cmd(d, "events"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    created: list[str] = []
    try:
        reader = LineReader(proc)
        # The subscription starts some time after the process does: retry until an event arrives.
        for i in range(25):
            name = f"{prefix}-{i}"
            r = both.one(d, "namespaces", "create", name)
            assert r.returncode == 0, r.stderr
            created.append(name)
            line = reader.read_until(lambda s: f'"{prefix}-' in s, timeout=0.4)
            if line is not None:
                m = re.search(rf'"name":"({re.escape(prefix)}-\d+)"', line)
                assert m, line
                return line, m.group(1)
        raise AssertionError(f"ctr events printed nothing for {prefix}")
    finally:
        stop_process(proc)
        both.one(d, "namespaces", "rm", *created)


def test_events_namespace_create(both: Ctr) -> None:
    prefix = unique("ev")
    lines = {}
    for name, d in (("pyctrd", both.pyd), ("containerd", both.ref)):
        line, created = first_create_event(both, d, prefix)
        m = re.fullmatch(rf"({GO_TIME_RE}) (\S+) (\S+) (.*)", line)
        assert m, (name, line)
        lines[name] = (m.group(2), m.group(3), m.group(4).replace(created, "<name>"))
    assert lines["pyctrd"] == lines["containerd"] == ("default", "/namespaces/create", '{"name":"<name>"}')


# ---------------------------------------------------------------------------------- errors by namespace


def test_invalid_namespace_fails_like_containerd(both: Ctr) -> None:
    both.same("-n", "bad!", "leases", "ls")
    p, _ = both("-n", "bad!", "leases", "ls")
    assert p.returncode == 1 and stderr_of(p).endswith(": invalid argument\n")


def test_missing_namespace_fails_like_containerd(both: Ctr) -> None:
    # ctr sends no usable namespace for -n '': the server must answer FailedPrecondition.
    both.same("-n", "", "leases", "ls")
    p, _ = both("-n", "", "leases", "ls")
    assert stderr_of(p) == "ctr: failed to list leases: namespace is required: failed precondition\n"


# ------------------------------------------------------------------ listing services, and missing ones


@pytest.mark.parametrize("command", [("content", "ls"), ("containers", "ls"), ("tasks", "ls")])
def test_list_commands_on_an_empty_namespace(both: Ctr, command: tuple[str, ...]) -> None:
    ns = unique("ns-empty")
    served = both.one(both.pyd, "plugins", "ls", "-q", "type==io.containerd.grpc.v1").stdout.split()
    p, c = both("-n", ns, *command)
    assert c.returncode == 0, c.stderr
    if command[0] in served:
        assert (p.returncode, p.stdout, stderr_of(p)) == (0, c.stdout, "")
    else:
        assert_not_implemented(p)
    both("namespaces", "rm", ns)


def assert_not_implemented(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 1
    # ctr content ls maps the status (FromGRPC); ctr tasks ls prints the raw rpc error.
    assert re.search(r"not implemented$|code = Unimplemented desc", r.stderr.strip()), r.stderr
    assert not re.search(r"transport|connection|Unavailable|deadline", r.stderr, re.I), r.stderr


def test_service_not_served_says_not_implemented(ctr_bin: str) -> None:
    """A service pyctrd does not serve answers UNIMPLEMENTED, which ctr shows as such."""
    base = daemons.new_base("pyctrd-partial-")
    config = os.path.join(base, "config.toml")
    with open(config, "w") as f:
        f.write(
            'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.content", "io.containerd.grpc.v1.tasks"]\n'
        )
    d = daemons.start_pyctrd(base, "--config", config)
    try:
        for command in (("content", "ls"), ("tasks", "ls")):
            r = daemons.run([ctr_bin, "-a", d.address, *command])
            assert_not_implemented(r)
        r = daemons.run([ctr_bin, "-a", d.address, "content", "ls"])
        assert r.stderr == (
            "ctr: unknown method List for service containerd.services.content.v1.Content: not implemented\n"
        )
    finally:
        daemons.cleanup(d)
