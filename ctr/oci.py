"""The OCI runtime spec ``pyctr run`` sends: containerd's default Linux spec plus the image config.

Defaults as containerd's ``oci.populateDefaultUnixSpec`` sets them (namespaces, mounts, the
default capability set, RLIMIT_NOFILE 1024, masked and read-only /proc and /sys paths, cgroups
path ``/<namespace>/<id>``), then the image's Env, Entrypoint + Cmd and WorkingDir. The image's
User needs the container's snapshot to resolve: :mod:`pyctr.ctr.users` does that. ``--privileged``
and ``--cap-add``/``--cap-drop`` change it as ctr's do (:func:`with_privileged`,
:func:`with_capabilities`).
"""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
DEFAULT_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

DEFAULT_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    },
    {
        "destination": "/dev/mqueue",
        "type": "mqueue",
        "source": "mqueue",
        "options": ["nosuid", "noexec", "nodev"],
    },
    {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    },
    {
        "destination": "/run",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
]


def default_spec(namespace: str, container_id: str) -> dict[str, Any]:
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2-dev",
        "root": {"path": "rootfs"},
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "env": [DEFAULT_ENV],
            "args": [],
            "noNewPrivileges": True,
            "capabilities": {"bounding": caps, "permitted": list(caps), "effective": list(caps)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "hostname": container_id,
        "mounts": copy.deepcopy(DEFAULT_MOUNTS),
        "linux": {
            "cgroupsPath": f"/{namespace}/{container_id}",
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``extra`` replaces variables of the same name in ``base``, and adds the others."""
    out = list(base)
    for item in extra:
        key = item.split("=", 1)[0]
        out = [e for e in out if e.split("=", 1)[0] != key]
        out.append(item)
    return out


def with_image_config(spec: dict[str, Any], config: Mapping[str, Any], args: Sequence[str]) -> None:
    """Apply an image config's ``config`` section and the command line's args."""
    cfg = config.get("config") or {}
    proc = spec["process"]
    proc["env"] = merge_env([DEFAULT_ENV], cfg.get("Env") or [])
    if args:
        proc["args"] = list(args)
    else:
        proc["args"] = list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
    if cfg.get("WorkingDir"):
        proc["cwd"] = cfg["WorkingDir"]


# Linux capabilities by number (linux/capability.h), to name the bits of a capability mask.
CAPABILITY_NAMES = (
    "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID "
    "CAP_SETUID CAP_SETPCAP CAP_LINUX_IMMUTABLE CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_NET_ADMIN "
    "CAP_NET_RAW CAP_IPC_LOCK CAP_IPC_OWNER CAP_SYS_MODULE CAP_SYS_RAWIO CAP_SYS_CHROOT CAP_SYS_PTRACE "
    "CAP_SYS_PACCT CAP_SYS_ADMIN CAP_SYS_BOOT CAP_SYS_NICE CAP_SYS_RESOURCE CAP_SYS_TIME "
    "CAP_SYS_TTY_CONFIG CAP_MKNOD CAP_LEASE CAP_AUDIT_WRITE CAP_AUDIT_CONTROL CAP_SETFCAP "
    "CAP_MAC_OVERRIDE CAP_MAC_ADMIN CAP_SYSLOG CAP_WAKE_ALARM CAP_BLOCK_SUSPEND CAP_AUDIT_READ "
    "CAP_PERFMON CAP_BPF CAP_CHECKPOINT_RESTORE"
).split()

# /dev subdirectories a privileged container does not take from the host (their own mounts, or
# runtime bookkeeping), as containerd skips them.
_SKIPPED_DEV_DIRS = frozenset(("pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"))


def current_capabilities(status_path: str = "/proc/self/status") -> list[str]:
    """The names of this process's effective capabilities (CapEff), lowest number first."""
    with open(status_path) as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return [name for bit, name in enumerate(CAPABILITY_NAMES) if mask >> bit & 1]


def host_devices(root: str = "/dev") -> list[dict[str, Any]]:
    """The character and block devices under ``root`` as spec devices (not symlinks or FIFOs)."""
    out: list[dict[str, Any]] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in _SKIPPED_DEV_DIRS:
                out += host_devices(entry.path)
            continue
        if entry.name == "console":
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else ""
        if kind:
            out.append(
                {
                    "path": entry.path,
                    "type": kind,
                    "major": os.major(st.st_rdev),
                    "minor": os.minor(st.st_rdev),
                    "fileMode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid,
                    "gid": st.st_gid,
                }
            )
    return out


def with_privileged(spec: dict[str, Any]) -> None:
    """What ctr's ``--privileged`` gives: every capability the caller has, no masked or read-only
    paths, writable /sys and cgroup mounts, all devices allowed and the host's devices in /dev."""
    caps = current_capabilities()
    spec["process"]["capabilities"] = {"bounding": caps, "permitted": list(caps), "effective": list(caps)}
    linux = spec.setdefault("linux", {})
    linux["maskedPaths"] = []
    linux["readonlyPaths"] = []
    for m in spec.get("mounts", []):
        if m.get("type") in ("sysfs", "cgroup"):
            m["options"] = ["rw" if o == "ro" else o for o in m.get("options", [])]
    linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    linux["devices"] = host_devices()


def with_capabilities(spec: dict[str, Any], add: Sequence[str] = (), drop: Sequence[str] = ()) -> None:
    """``--cap-add`` / ``--cap-drop``: names with the ``CAP_`` prefix, in all three sets."""
    for name in (*add, *drop):
        if not name.startswith("CAP_"):
            raise ValueError(f"capabilities must be specified with 'CAP_' prefix: {name!r}")
    sets = spec["process"].setdefault("capabilities", {})
    for key in ("bounding", "effective", "permitted"):
        current = sets.setdefault(key, [])
        current.extend(name for name in add if name not in current)
        sets[key] = [name for name in current if name not in drop]
