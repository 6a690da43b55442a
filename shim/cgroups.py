"""Container cgroup metrics (for Stats) and OOM notifications, for cgroup v1 and v2 hosts.

Stats answers with an Any the daemon passes on untouched: ``io.containerd.cgroups.v1.Metrics`` on v1
and hybrid hosts (the test machines: v1 controllers plus a controller-less cgroup2 mount), or
``io.containerd.cgroups.v2.Metrics`` when ``/sys/fs/cgroup`` is cgroup2 itself. Neither message has
generated code in pyctr.api, so the fields ctr, CRI and dockerd read are encoded here by number (the field
numbers are those of ``github.com/containerd/cgroups`` ``stats/v1`` and ``v2/stats``). Files that are
missing (the container's cgroup is gone once it exited) read as zero, like cgroups.IgnoreNotExist.

OOM: v1 registers an eventfd on ``memory.oom_control`` through ``cgroup.event_control``; v2 watches
``memory.events`` with inotify and reports when ``oom_kill`` grows.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pyctr.api import pblite as pw

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
V1_METRICS_URL = "io.containerd.cgroups.v1.Metrics"
V2_METRICS_URL = "io.containerd.cgroups.v2.Metrics"
_MAX = (1 << 64) - 1  # "max" in a limit file, as containerd/cgroups reports it
_USER_HZ = 100  # cpuacct.stat counts in USER_HZ ticks

# memory.stat key -> field number of io.containerd.cgroups.v1.MemoryStat
_V1_MEMORY_STAT = {
    name: number
    for number, name in enumerate(
        (
            "cache rss rss_huge mapped_file dirty writeback pgpgin pgpgout pgfault pgmajfault inactive_anon "
            "active_anon inactive_file active_file unevictable hierarchical_memory_limit hierarchical_memsw_limit "
            "total_cache total_rss total_rss_huge total_mapped_file total_dirty total_writeback total_pgpgin "
            "total_pgpgout total_pgfault total_pgmajfault total_inactive_anon total_active_anon "
            "total_inactive_file total_active_file total_unevictable"
        ).split(),
        start=1,
    )
}
# memory.stat key -> field number of io.containerd.cgroups.v2.MemoryStat
_V2_MEMORY_STAT = {
    name: number
    for number, name in enumerate(
        (
            "anon file kernel_stack slab sock shmem file_mapped file_dirty file_writeback anon_thp "
            "inactive_anon active_anon inactive_file active_file unevictable slab_reclaimable slab_unreclaimable "
            "pgfault pgmajfault workingset_refault workingset_activate workingset_nodereclaim pgrefill pgscan "
            "pgsteal pgactivate pgdeactivate pglazyfree pglazyfreed thp_fault_alloc thp_collapse_alloc"
        ).split(),
        start=1,
    )
}
_V2_CPU_STAT = {
    "usage_usec": 1,
    "user_usec": 2,
    "system_usec": 3,
    "nr_periods": 4,
    "nr_throttled": 5,
    "throttled_usec": 6,
}
_V2_MEMORY_EVENTS = {"low": 1, "high": 2, "max": 3, "oom": 4, "oom_kill": 5}
# blkio.<name> -> field number of io.containerd.cgroups.v1.BlkIOStat. The CFQ/BFQ-era files are read
# when the kernel has them; when it has none, or they hold no entries, the throttle counters stand in
# for bytes and operations (as containerd/cgroups does, with their non-recursive names).
_V1_BLKIO = {
    "io_service_bytes_recursive": 1,
    "io_serviced_recursive": 2,
    "io_queued_recursive": 3,
    "io_service_time_recursive": 4,
    "io_wait_time_recursive": 5,
    "io_merged_recursive": 6,
    "time_recursive": 7,
    "sectors_recursive": 8,
}
_V1_BLKIO_THROTTLE = {"throttle.io_service_bytes": 1, "throttle.io_serviced": 2}


def unified(root: str = CGROUP_ROOT) -> bool:
    """True on a pure cgroup2 host; hybrid hosts (v1 controllers + cgroup2 elsewhere) count as v1."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
        return ""
    except OSError as exc:
        log.debug("cgroups: reading %s: %s", path, exc)
        return ""


def _uint(path: str) -> int:
    text = _read(path).strip()
    if text == "max":
        return _MAX
    try:
        return int(text)
    except ValueError:
        return 0


def _flat_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = _MAX if parts[1] == "max" else int(parts[1])
    return out


def proc_cgroups(pid: int) -> dict[str, str]:
    """controller -> cgroup path of a process (``""`` is the cgroup2 path), from /proc/<pid>/cgroup."""
    paths: dict[str, str] = {}
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller.removeprefix("name=")] = parts[2]
    return paths


def v1_mountpoints(mountinfo: str = "/proc/self/mountinfo") -> dict[str, tuple[str, str]]:
    """controller -> (mount point, cgroup path mounted there) of each v1 hierarchy."""
    points: dict[str, tuple[str, str]] = {}
    for line in _read(mountinfo).splitlines():
        pre, _, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] != "cgroup":
            continue
        for option in rest[2].split(","):
            points.setdefault(option.removeprefix("name="), (fields[4], fields[3]))
    return points


@dataclass
class Cgroup:
    """Where one container's cgroup lives; resolved while its init runs, read after it exits too."""

    v2: bool
    path: str = ""  # v2: directory under the cgroup2 root
    dirs: dict[str, str] = field(default_factory=dict)  # v1: controller -> directory

    @classmethod
    def for_pid(cls, pid: int, root: str = CGROUP_ROOT) -> Cgroup | None:
        paths = proc_cgroups(pid)
        if not paths:
            return None
        if unified(root):
            rel = paths.get("", "/")
            return cls(v2=True, path=os.path.join(root, rel.lstrip("/")))
        mounts = v1_mountpoints()
        dirs = {}
        for controller, rel in paths.items():
            if controller in mounts:
                # A hierarchy may be mounted from a sub-cgroup (nested containers): strip that prefix.
                point, mounted = mounts[controller]
                dirs[controller] = os.path.normpath(os.path.join(point, os.path.relpath(rel, mounted)))
        return cls(v2=False, dirs=dirs)

    def metrics(self) -> tuple[str, bytes]:
        """(type_url, encoded Metrics) for Stats."""
        if self.v2:
            return V2_METRICS_URL, v2_metrics(self.path)
        return V1_METRICS_URL, v1_metrics(self.dirs)

    def memory_dir(self) -> str:
        return self.path if self.v2 else self.dirs.get("memory", "")


def hugepage_sizes(root: str = "/sys/kernel/mm/hugepages") -> list[str]:
    """The host's huge page sizes as cgroup files name them ("2MB", "1GB"), from the
    ``hugepages-<n>kB`` directories, in directory-name order as containerd lists them."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    sizes = []
    for name in names:
        kib = name.removeprefix("hugepages-").removesuffix("kB")
        if not kib.isdigit():
            continue
        value, unit = float(kib), 1  # in KB; as docker's units.CustomSize, base 1024
        while value >= 1024 and unit < len(_SIZE_UNITS) - 1:
            value, unit = value / 1024, unit + 1
        sizes.append(f"{value:g}{_SIZE_UNITS[unit]}")
    return sizes


_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def _rdma_entries(path: str) -> list[bytes]:
    """RdmaEntry bodies of rdma.current or rdma.max: ``<device> hca_handle=N hca_object=N`` lines
    ("max" is 2^32-1, the fields being uint32)."""
    entries = []
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        counts = {"hca_handle": 0, "hca_object": 0}
        for pair in parts[1:]:
            key, _, value = pair.partition("=")
            if key in counts:
                counts[key] = (1 << 32) - 1 if value == "max" else int(value) if value.isdigit() else 0
        entries.append(
            pw.string(1, parts[0]) + pw.uint(2, counts["hca_handle"]) + pw.uint(3, counts["hca_object"])
        )
    return entries


def _rdma(path: str) -> bytes:
    """An RdmaStat body: the current use and the limits, per device."""
    return pw.repeated(1, _rdma_entries(f"{path}/rdma.current")) + pw.repeated(
        2, _rdma_entries(f"{path}/rdma.max")
    )


def v1_metrics(dirs: dict[str, str], hugepages: list[str] | None = None) -> bytes:
    out = b""
    if hugetlb := dirs.get("hugetlb"):
        for size in hugepage_sizes() if hugepages is None else hugepages:
            prefix = f"{hugetlb}/hugetlb.{size}"
            out += pw.message(
                1,
                pw.uint(1, _uint(f"{prefix}.usage_in_bytes"))
                + pw.uint(2, _uint(f"{prefix}.max_usage_in_bytes"))
                + pw.uint(3, _uint(f"{prefix}.failcnt"))
                + pw.string(4, size),
            )
    if pids := dirs.get("pids"):
        # v1 reports an unlimited pids.max ("max") as limit 0, where v2 reports it as 2^64-1.
        limit = _uint(f"{pids}/pids.max")
        out += pw.message(
            2, pw.uint(1, _uint(f"{pids}/pids.current")) + pw.uint(2, 0 if limit == _MAX else limit)
        )
    cpuacct, cpu = dirs.get("cpuacct"), dirs.get("cpu")
    if cpuacct or cpu:
        usage = b""
        if cpuacct:
            stat = _flat_keyed(f"{cpuacct}/cpuacct.stat")
            per_cpu = [int(v) for v in _read(f"{cpuacct}/cpuacct.usage_percpu").split() if v.isdigit()]
            tick_ns = 1_000_000_000 // _USER_HZ
            usage = (
                pw.uint(1, _uint(f"{cpuacct}/cpuacct.usage"))
                + pw.uint(2, stat.get("system", 0) * tick_ns)
                + pw.uint(3, stat.get("user", 0) * tick_ns)
                + pw.packed(4, per_cpu)
            )
        throttle = b""
        if cpu:
            stat = _flat_keyed(f"{cpu}/cpu.stat")
            throttle = (
                pw.uint(1, stat.get("nr_periods", 0))
                + pw.uint(2, stat.get("nr_throttled", 0))
                + pw.uint(3, stat.get("throttled_time", 0))
            )
        out += pw.message(3, pw.message(1, usage) + pw.message(2, throttle))
    if memory := dirs.get("memory"):
        stat = _flat_keyed(f"{memory}/memory.stat")
        body = b"".join(pw.uint(number, stat.get(name, 0)) for name, number in _V1_MEMORY_STAT.items())
        for number, prefix in (
            (33, "memory"),
            (34, "memory.memsw"),
            (35, "memory.kmem"),
            (36, "memory.kmem.tcp"),
        ):
            entry = (
                pw.uint(1, _uint(f"{memory}/{prefix}.limit_in_bytes"))
                + pw.uint(2, _uint(f"{memory}/{prefix}.usage_in_bytes"))
                + pw.uint(3, _uint(f"{memory}/{prefix}.max_usage_in_bytes"))
                + pw.uint(4, _uint(f"{memory}/{prefix}.failcnt"))
            )
            body += pw.message(number, entry)
        out += pw.message(4, body)
    if blkio := dirs.get("blkio"):
        out += pw.message(5, v1_blkio(blkio))
    if rdma := dirs.get("rdma"):
        out += pw.message(6, _rdma(rdma))
    if memory:
        oom = _flat_keyed(f"{memory}/memory.oom_control")
        out += pw.message(
            9,
            pw.uint(1, oom.get("oom_kill_disable", 0))
            + pw.uint(2, oom.get("under_oom", 0))
            + pw.uint(3, oom.get("oom_kill", 0)),
        )
    return out


def v1_blkio(path: str, partitions: str = "/proc/partitions") -> bytes:
    """The body of a v1 BlkIOStat. Always sent once the controller is there, even with no entries:
    dockerd turns a missing one into ``null`` lists where containerd gives it empty ones."""
    devices = _devices(partitions)

    def body(files: dict[str, int]) -> bytes:
        return b"".join(
            pw.repeated(number, _blkio_entries(f"{path}/blkio.{name}", devices))
            for name, number in files.items()
        )

    recursive = body(_V1_BLKIO) if os.path.exists(f"{path}/blkio.io_serviced_recursive") else b""
    return recursive or body(_V1_BLKIO_THROTTLE)


def _blkio_entries(path: str, devices: dict[tuple[int, int], str]) -> list[bytes]:
    """BlkIOEntry bodies of one blkio file: ``major:minor [op] value`` lines; ``Total`` is left out."""
    entries = []
    for line in _read(path).splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) not in (3, 4) or not all(p.isdigit() for p in (parts[0], parts[1], parts[-1])):
            continue  # "Total N", or a line this reader does not know
        major, minor, value = int(parts[0]), int(parts[1]), int(parts[-1])
        op = parts[2] if len(parts) == 4 else ""
        entries.append(
            pw.string(1, op)
            + pw.string(2, devices.get((major, minor), ""))
            + pw.uint(3, major)
            + pw.uint(4, minor)
            + pw.uint(5, value)
        )
    return entries


def _devices(partitions: str) -> dict[tuple[int, int], str]:
    """(major, minor) -> /dev/<name>, from /proc/partitions (two header lines, then one per device)."""
    devices: dict[tuple[int, int], str] = {}
    for line in _read(partitions).splitlines()[2:]:
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            devices.setdefault((int(parts[0]), int(parts[1])), f"/dev/{parts[3]}")
    return devices


def v2_metrics(path: str) -> bytes:
    out = pw.message(1, pw.uint(1, _uint(f"{path}/pids.current")) + pw.uint(2, _uint(f"{path}/pids.max")))
    cpu = _flat_keyed(f"{path}/cpu.stat")
    out += pw.message(2, b"".join(pw.uint(n, cpu.get(k, 0)) for k, n in _V2_CPU_STAT.items()))
    stat = _flat_keyed(f"{path}/memory.stat")
    memory = b"".join(pw.uint(n, stat.get(k, 0)) for k, n in _V2_MEMORY_STAT.items())
    memory += (
        pw.uint(32, _uint(f"{path}/memory.current"))
        + pw.uint(33, _uint(f"{path}/memory.max"))
        + pw.uint(34, _uint(f"{path}/memory.swap.current"))
        + pw.uint(35, _uint(f"{path}/memory.swap.max"))
    )
    out += pw.message(4, memory)
    out += pw.message(5, _rdma(path))
    out += pw.message(6, b"".join(pw.message(1, entry) for entry in _v2_io(f"{path}/io.stat")))
    out += pw.repeated(7, _v2_hugetlb(path))
    events = _flat_keyed(f"{path}/memory.events")
    out += pw.message(8, b"".join(pw.uint(n, events.get(k, 0)) for k, n in _V2_MEMORY_EVENTS.items()))
    return out


def _v2_hugetlb(path: str) -> list[bytes]:
    """HugeTlbStat bodies from ``hugetlb.<size>.current`` and ``.max``, one per page size."""
    sizes: dict[str, dict[str, int]] = {}
    try:
        names = os.listdir(path)
    except OSError:
        return []
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] in ("current", "max"):
            sizes.setdefault(parts[1], {})[parts[2]] = _uint(f"{path}/{name}")
    return [
        pw.uint(1, values.get("current", 0)) + pw.uint(2, values.get("max", 0)) + pw.string(3, size)
        for size, values in sorted(sizes.items())
    ]


def _v2_io(path: str) -> list[bytes]:
    """io.stat's lines (``MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N``) as IOEntry
    messages; the message goes out even without entries, as containerd's does."""
    entries = []
    for line in _read(path).splitlines():
        device, *pairs = line.split() or [""]
        major, sep, minor = device.partition(":")
        if not sep or not major.isdigit() or not minor.isdigit():
            continue  # a blank line, or one this reader does not know
        counters = dict(pair.partition("=")[::2] for pair in pairs)
        entry = pw.uint(1, int(major)) + pw.uint(2, int(minor))
        for number, key in enumerate(("rbytes", "wbytes", "rios", "wios"), start=3):
            value = counters.get(key, "")
            entry += pw.uint(number, int(value) if value.isdigit() else 0)
        entries.append(entry)
    return entries


# -- OOM ----------------------------------------------------------------------------------------------

_IN_MODIFY = 0x2
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


def open_oom_fds(cgroup: Cgroup) -> tuple[dict[str, Any], list[int]] | None:
    """The OOM notification fds of ``cgroup`` for the keeper, which watches them in its own loop:
    ``({"v2", "path", "last"}, fds)``, the first fd the one to poll; None without a memory cgroup.

    v1: an eventfd registered on ``memory.oom_control`` (kept open with it); ``path`` is that file,
    whose disappearance means the cgroup is gone. v2: inotify on ``memory.events``; ``path`` is that
    file and ``last`` its ``oom_kill`` count now.
    """
    memory = cgroup.memory_dir()
    if not memory or not os.path.isdir(memory):
        return None
    if not cgroup.v2:
        return {"v2": False, "path": f"{memory}/memory.oom_control"}, list(_oom_eventfd(memory))
    events_file = f"{memory}/memory.events"
    fd = _oom_inotify(events_file)
    return {"v2": True, "path": events_file, "last": _flat_keyed(events_file).get("oom_kill", 0)}, [fd]


def _oom_eventfd(memory: str) -> tuple[int, int]:
    """cgroup v1: an eventfd registered for OOM notices on ``memory.oom_control``, and that file's
    fd, which must stay open with it: ``(eventfd, oom_control fd)``."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ofd = -1
    try:
        ofd = os.open(f"{memory}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        with open(f"{memory}/cgroup.event_control", "w") as f:
            f.write(f"{efd} {ofd}")
    except OSError:
        os.close(efd)
        if ofd >= 0:
            os.close(ofd)
        raise
    return efd, ofd


def _oom_inotify(events_file: str) -> int:
    """cgroup v2: a non-blocking inotify fd watching ``memory.events`` for changes."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if libc.inotify_add_watch(fd, events_file.encode(), _IN_MODIFY) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err))
    return fd


def describe(pid: int) -> dict[str, Any] | None:
    """Where ``pid``'s cgroup is, as plain data the keeper keeps (``Cgroup(**data)`` rebuilds it)."""
    try:
        cgroup = Cgroup.for_pid(pid)
    except OSError:
        return None
    if cgroup is None:
        return None
    return {"v2": cgroup.v2, "path": cgroup.path, "dirs": dict(cgroup.dirs)}


def oom_watch(data: dict[str, Any]) -> tuple[dict[str, Any], list[int]] | None:
    """:func:`open_oom_fds` for :func:`describe`'s data; None (logged) when it cannot be watched."""
    try:
        return open_oom_fds(Cgroup(**data))
    except OSError as exc:
        log.warning("oom: cannot watch %s: %s", data, exc)
        return None
