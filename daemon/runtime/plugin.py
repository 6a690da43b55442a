"""The ``io.containerd.runtime.v2.task`` plugin: the task manager, with the tasks found again."""

from __future__ import annotations

import os
import sys

from pyctr.daemon import plugin
from pyctr.daemon.runtime.manager import TaskManager


async def _init(ic: plugin.InitContext) -> TaskManager:
    cfg = ic.plugin_config
    manager = TaskManager(
        root=ic.root,
        state=ic.state,
        grpc_address=ic.config.grpc.address,
        ttrpc_address=ic.config.ttrpc_address,
        exchange=ic.get(plugin.EVENT),
        runtimes=dict(cfg.get("runtimes", {})) or None,
        # Our own shim is installed beside pyctrd (in the venv or /usr/local/bin).
        search_path=[os.path.dirname(os.path.abspath(sys.argv[0]))] if sys.argv and sys.argv[0] else [],
    )
    manager.debug = ic.config.debug.level in ("debug", "trace")
    os.makedirs(ic.root, mode=0o711, exist_ok=True)
    os.makedirs(ic.state, mode=0o711, exist_ok=True)
    ic.set_platform()
    # Before the socket serves, as containerd loads its tasks: Tasks.List sees every one.
    await manager.restore()
    return manager


REGISTRATION = plugin.Registration(
    type=plugin.RUNTIME,
    id="task",
    init=_init,
    requires=(plugin.EVENT, plugin.METADATA),
    config={"runtimes": {"io.containerd.runc.v2": "containerd-shim-pyrunc-v2"}},
)
