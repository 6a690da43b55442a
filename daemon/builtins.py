"""Every plugin pyctrd ships, in one explicit list (start order is derived from ``requires``)."""

from __future__ import annotations

from typing import Any

from pyctr.daemon import events
from pyctr.daemon.gc import plugin as gc_plugin
from pyctr.daemon.metadata import plugin as metadata_plugin
from pyctr.daemon.plugin import Registration
from pyctr.daemon.services import (
    containers,
    content,
    diff,
    health,
    images,
    introspection,
    leases,
    namespaces,
    snapshots,
    streaming,
    tasks,
    transfer,
    version,
)
from pyctr.daemon.services import events as events_service
from pyctr.daemon.snapshots import plugin as snapshots_plugin

BUILTINS: list[Registration] = [
    metadata_plugin.REGISTRATION,
    events.REGISTRATION,
    content.STORE_REGISTRATION,
    gc_plugin.REGISTRATION,
    snapshots_plugin.OVERLAY_REGISTRATION,
    snapshots_plugin.NATIVE_REGISTRATION,
    snapshots_plugin.SERVICE_REGISTRATION,
    diff.DIFFER_REGISTRATION,
    tasks.RUNTIME_REGISTRATION,
    streaming.MANAGER_REGISTRATION,
    version.REGISTRATION,
    health.REGISTRATION,
    namespaces.REGISTRATION,
    events_service.REGISTRATION,
    events_service.TTRPC_REGISTRATION,
    leases.REGISTRATION,
    content.REGISTRATION,
    snapshots.REGISTRATION,
    images.REGISTRATION,
    containers.REGISTRATION,
    tasks.REGISTRATION,
    streaming.REGISTRATION,
    transfer.REGISTRATION,
    diff.REGISTRATION,
    introspection.REGISTRATION,
]


def plugin_defaults() -> dict[str, dict[str, Any]]:
    """Each plugin's default configuration table, for ``pyctrd config default``."""
    return {r.uri: dict(r.config) for r in BUILTINS if r.config}
