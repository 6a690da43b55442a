"""What the daemon imports before it can serve: the code for work that has not arrived stays out.

Start-up time is imports (docs/benchmarks.md, profiling note). Registry clients, layer (un)packing,
compression and the gRPC services are not on the path to serving: they load on first use, or on
the background thread that fills the plugins' start-up waits (daemon/daemon.py); this test keeps
them off that path (aiohttp alone once cost ~165 ms of start-up).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

DEFERRED = (
    "aiohttp",
    "tarfile",
    "isal",
    "zstandard",
    "pyctr.snapshotter.layer",
    "pkgutil",
    # The gRPC services load with their first call (daemon/services/__init__.py), the task API
    # with the first task, the transfer side streams with the first Streaming or Transfer call.
    "pyctr.daemon.services.version",
    "pyctr.daemon.services.tasks",
    "pyctr.daemon.services.containers",
    "pyctr.daemon.services.content",
    "pyctr.daemon.services.events",
    "pyctr.daemon.runtime.shim",
    "pyctr.daemon.transfer.streams",
    "pyctr.api._pb.containerd.task.v2",
    "pyctr.api._pb.containerd.events",
    "pyctr.api._pb.containerd.services.version.v1",
    # Generated code takes its service bases from pyctr.api.pbgrpc, not betterproto2.grpclib.
    "grpclib.server",
    "h2",
    "dateutil",
    # structlog loads with the first line the daemon writes (pyctr.api.log).
    "structlog",
    # Never needed at all: os.uname() and a ten-line percent-encoder stand in (~4 ms of imports).
    "platform",
    "urllib.parse",
    # Only a bundle delete unmounts (daemon/runtime/bundle.py loads ctypes then).
    "ctypes",
)


def loaded(imports: str, modules: Sequence[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running the statement ``imports``."""
    code = f"import sys\n{imports}\nprint(' '.join(m for m in {tuple(modules)!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_start_up_leaves_out_what_the_first_request_needs() -> None:
    assert loaded("import pyctr.daemon.main, pyctr.daemon.builtins, pyctr.daemon.daemon", DEFERRED) == []


def test_every_grpc_service_loads_under_its_declared_name() -> None:
    """Each lazily loaded service serves exactly the service name its registration declares."""
    import importlib

    from pyctr.daemon import plugin, services
    from pyctr.daemon.builtins import BUILTINS

    ids = {r.id for r in BUILTINS if r.type == plugin.GRPC}
    assert ids == set(services.DECLARED)
    for id_, (name, module) in services.DECLARED.items():
        mod = importlib.import_module(f"pyctr.daemon.services.{module}")
        cls = getattr(mod, mod.service.__annotations__["return"])
        paths = {path.split("/")[1] for path in cls.__mapping__(object.__new__(cls))}
        assert paths == {name}, id_


def test_reconnecting_to_shims_leaves_out_shim_start_and_event_messages() -> None:
    """A restarted daemon loads the shim client for its running tasks; starting shims (the
    launcher client) and the event messages (published only for a task that exited meanwhile)
    stay out until they are needed."""
    imports = (
        "import pyctr.daemon.daemon, pyctr.daemon.runtime.shim\n"
        "from pyctr.api._pb.containerd.task import v2\n"
        "from pyctr.api._pb.containerd.v1.types import Status"
    )
    assert loaded(imports, ("pyctr.shim.start", "pyctr.api._pb.containerd.events")) == []


def test_no_process_of_ours_loads_importlib_metadata() -> None:
    """The daemon's start-up, the CLI and the shim launcher's imports stay without it (and zipfile,
    email, csv ...): ~1.8 MiB of heap each, in the launcher's case shared by every shim. betterproto2
    would load it for its version string; pyctr.api.bp2version stands in."""
    imports = (
        "import pyctr.daemon.main, pyctr.daemon.builtins, pyctr.daemon.daemon, pyctr.ctr.main\n"
        "import pyctr.shim.launcher, pyctr.shim.keeper, pyctr.shim.worker\n"
        "import pyctr.api._pb.containerd.task.v2, pyctr.api._pb.containerd.events"
    )
    assert loaded(imports, ("importlib.metadata", "zipfile", "email")) == []


def test_background_imports_load_services_and_extras_and_survive_failures() -> None:
    code = (
        "import sys\n"
        "import pyctr.daemon.builtins\n"
        "from pyctr.daemon.daemon import LAYER_MODULES\n"
        "from pyctr.daemon.services import import_in_background\n"
        "thread = import_in_background(['content', 'no-such-plugin'], ('no.such.module', *LAYER_MODULES))\n"
        "thread.join(60)\n"
        "wanted = ('pyctr.daemon.services.content', 'pyctr.snapshotter.layer.apply', 'tarfile')\n"
        "print(thread.is_alive(), ' '.join(m for m in wanted if m not in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
