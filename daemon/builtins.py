"""Every plugin pyctrd ships, in one explicit list (start order is derived from ``requires``).

The gRPC services are declared here by name and module: their code loads with their first call
(``daemon/services/__init__.py``), so start-up imports only the core plugins.
"""

from __future__ import annotations

from typing import Any

from pyctr.daemon import events, services
from pyctr.daemon.content import plugin as content_plugin
from pyctr.daemon.diff import plugin as diff_plugin
from pyctr.daemon.gc import plugin as gc_plugin
from pyctr.daemon.metadata import plugin as metadata_plugin
from pyctr.daemon.plugin import CONTENT, DIFF, EVENT, GC, INTERNAL, METADATA, RUNTIME, SERVICE, Registration
from pyctr.daemon.runtime import plugin as runtime_plugin
from pyctr.daemon.services import events_ttrpc
from pyctr.daemon.snapshots import plugin as snapshots_plugin

_grpc = services.registration

BUILTINS: list[Registration] = [
    metadata_plugin.REGISTRATION,
    events.REGISTRATION,
    content_plugin.REGISTRATION,
    gc_plugin.REGISTRATION,
    snapshots_plugin.OVERLAY_REGISTRATION,
    snapshots_plugin.NATIVE_REGISTRATION,
    snapshots_plugin.SERVICE_REGISTRATION,
    diff_plugin.REGISTRATION,
    runtime_plugin.REGISTRATION,
    services.STREAMS_REGISTRATION,
    _grpc("version", "containerd.services.version.v1.Version", "version"),
    _grpc("healthcheck", "grpc.health.v1.Health", "health"),
    _grpc("namespaces", "containerd.services.namespaces.v1.Namespaces", "namespaces", (METADATA, EVENT)),
    _grpc("events", "containerd.services.events.v1.Events", "events", (EVENT,)),
    events_ttrpc.REGISTRATION,
    # Leases, images and containers work without a collector (nothing is then reclaimed).
    _grpc("leases", "containerd.services.leases.v1.Leases", "leases", (METADATA, GC), needs=(METADATA,)),
    _grpc("content", "containerd.services.content.v1.Content", "content", (CONTENT, EVENT)),
    _grpc("snapshots", "containerd.services.snapshots.v1.Snapshots", "snapshots", (SERVICE, EVENT)),
    _grpc(
        "images",
        "containerd.services.images.v1.Images",
        "images",
        (METADATA, EVENT, GC),
        needs=(METADATA, EVENT),
    ),
    _grpc(
        "containers",
        "containerd.services.containers.v1.Containers",
        "containers",
        (METADATA, EVENT, GC),
        needs=(METADATA, EVENT),
    ),
    _grpc("tasks", "containerd.services.tasks.v1.Tasks", "tasks", (METADATA, RUNTIME, CONTENT)),
    _grpc("streaming", "containerd.services.streaming.v1.Streaming", "streaming", (INTERNAL,)),
    _grpc(
        "transfer",
        "containerd.services.transfer.v1.Transfer",
        "transfer",
        (METADATA, CONTENT, SERVICE, DIFF, EVENT, INTERNAL),
        # Where per-registry hosts.toml files live (containerd's registry config_path).
        config={"config_path": "/etc/pyctrd/certs.d"},
    ),
    _grpc("diff", "containerd.services.diff.v1.Diff", "diff", (DIFF,)),
    _grpc("introspection", "containerd.services.introspection.v1.Introspection", "introspection"),
]


def plugin_defaults() -> dict[str, dict[str, Any]]:
    """Each plugin's default configuration table, for ``pyctrd config default``."""
    return {r.uri: dict(r.config) for r in BUILTINS if r.config}
