"""The OCI runtime spec ``pyctr run`` sends: containerd's default Linux spec plus the image config.

Defaults as containerd's ``oci.populateDefaultUnixSpec`` sets them (namespaces, mounts, the
default capability set, RLIMIT_NOFILE 1024, masked and read-only /proc and /sys paths, cgroups
path ``/<namespace>/<id>``), then the image's Env, Entrypoint + Cmd and WorkingDir. The image's
User needs the container's snapshot to resolve: :mod:`pyctr.ctr.users` does that.
"""

from __future__ import annotations

import copy
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
