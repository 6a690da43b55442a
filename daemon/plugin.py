"""The plugin registry: declared registrations, started in dependency order.

Each module that provides a plugin declares a :class:`Registration`; ``daemon/builtins.py`` lists
them all explicitly, in a stable order. At start-up the registry sorts them so that every plugin
starts after the plugin *types* it requires (``"*"`` means every other type), initialises each
one once (concurrently with every plugin it does not depend on), and records a failure instead
of aborting, as containerd does: Introspection reports each plugin with its error, and a plugin
that asks for a failed dependency fails in turn.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyctr.api.log import get_logger
from pyctr.daemon.config import Config

log = get_logger("pyctrd.plugin")

# Plugin types, named as containerd names them.
METADATA = "io.containerd.metadata.v1"
EVENT = "io.containerd.event.v1"
LEASE = "io.containerd.lease.v1"
GC = "io.containerd.gc.v1"
SERVICE = "io.containerd.service.v1"
GRPC = "io.containerd.grpc.v1"
TTRPC = "io.containerd.ttrpc.v1"
CONTENT = "io.containerd.content.v1"
SNAPSHOT = "io.containerd.snapshotter.v1"
DIFF = "io.containerd.differ.v1"
RUNTIME = "io.containerd.runtime.v2"
INTERNAL = "io.containerd.internal.v1"


class SkipPlugin(Exception):
    """Raised by an init function when the plugin does not apply here (reported as ``skip``)."""

    def __str__(self) -> str:
        text = super().__str__()
        return text if "skip plugin" in text else f"skip plugin: {text}"


class PluginNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Registration:
    type: str
    id: str
    init: Callable[[InitContext], Awaitable[Any]]
    requires: tuple[str, ...] = ()
    # Default configuration (a plain dict); the TOML table [plugins."<type>.<id>"] overrides keys.
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"


class Plugin:
    """A registration once initialised: its instance or its error, and what it exports."""

    __slots__ = ("capabilities", "error", "exports", "instance", "platforms", "registration")

    def __init__(self, registration: Registration) -> None:
        self.registration = registration
        self.instance: Any = None
        self.error: BaseException | None = None
        self.exports: dict[str, str] = {}
        self.capabilities: list[str] = []
        self.platforms: list[tuple[str, str, str]] = []


class InitContext:
    """What an init function sees: its own directories and config, and the plugins before it."""

    def __init__(self, registry: Registry, plugin: Plugin) -> None:
        reg = plugin.registration
        self._registry = registry
        self._plugin = plugin
        self.config = registry.config
        self.root = os.path.join(registry.config.root, reg.uri)
        self.state = os.path.join(registry.config.state, reg.uri)
        merged = dict(reg.config)
        merged.update(registry.config.plugins.get(reg.uri, {}))
        self.plugin_config = merged

    @property
    def exports(self) -> dict[str, str]:
        return self._plugin.exports

    @property
    def capabilities(self) -> list[str]:
        return self._plugin.capabilities

    def set_platform(self, os_: str = "linux", arch: str = "", variant: str = "") -> None:
        """Declare the platform this plugin serves (the host's architecture by default)."""
        machine = os.uname().machine  # platform.machine() is this, behind a ~1.3 ms import
        arch = arch or {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        self._plugin.platforms.append((os_, arch, variant))

    def _check_ready(self, p: Plugin) -> None:
        # Inits run concurrently: only the types a plugin requires are sure to be finished.
        if p.registration.uri in self._registry.pending:
            raise RuntimeError(
                f"plugin {self._plugin.registration.uri} uses {p.registration.uri} before it is "
                f"initialised: add {p.registration.type} to its requires"
            )

    def get(self, type_: str) -> Any:
        """The first initialised plugin of ``type_``; its failure is ours."""
        for p in self._registry.plugins:
            if p.registration.type == type_:
                self._check_ready(p)
                if p.error is not None:
                    raise PluginNotFound(f"plugin {p.registration.uri} failed: {p.error}")
                return p.instance
        raise PluginNotFound(f"no plugins registered for {type_}: not found")

    def get_by_id(self, type_: str, id_: str) -> Any:
        for p in self._registry.plugins:
            if p.registration.type == type_ and p.registration.id == id_:
                self._check_ready(p)
                if p.error is not None:
                    raise PluginNotFound(f"plugin {p.registration.uri} failed: {p.error}")
                return p.instance
        raise PluginNotFound(f"plugin {type_}.{id_}: not found")

    def get_all(self, type_: str) -> dict[str, Any]:
        """Every initialised plugin of ``type_``, by id (failed ones left out)."""
        for p in self._registry.plugins:
            if p.registration.type == type_:
                self._check_ready(p)
        return {
            p.registration.id: p.instance
            for p in self._registry.plugins
            if p.registration.type == type_ and p.error is None
        }

    @property
    def registry(self) -> Registry:
        return self._registry


def dependencies(regs: Iterable[Registration]) -> dict[str, list[Registration]]:
    """Each registration's URI -> the registrations it starts after (those of the types it requires).

    ``"*"`` stands for every other type, except plugins that require ``"*"`` themselves.
    """
    regs = list(regs)
    by_type: dict[str, list[Registration]] = {}
    for r in regs:
        by_type.setdefault(r.type, []).append(r)
    result: dict[str, list[Registration]] = {}
    for r in regs:
        found: list[Registration] = []
        for t in r.requires:
            if t == "*":
                found.extend(x for x in regs if x.type != r.type and "*" not in x.requires)
            else:
                found.extend(by_type.get(t, []))
        result[r.uri] = found
    return result


def sort_registrations(regs: Iterable[Registration]) -> list[Registration]:
    """Order registrations so each follows the types it requires; stable otherwise.

    A requirement of ``"*"`` puts a plugin after every plugin of any other type. A cycle is a
    programming error and raises ValueError.
    """
    regs = list(regs)
    uris = [r.uri for r in regs]
    if len(set(uris)) != len(uris):
        dup = sorted({u for u in uris if uris.count(u) > 1})
        raise ValueError(f"plugin registered twice: {', '.join(dup)}")
    out: list[Registration] = []
    placed: set[str] = set()
    visiting: set[str] = set()
    deps = dependencies(regs)

    def visit(r: Registration) -> None:
        if r.uri in placed:
            return
        if r.uri in visiting:
            raise ValueError(f"plugin dependency cycle through {r.uri}")
        visiting.add(r.uri)
        for d in deps[r.uri]:
            visit(d)
        visiting.discard(r.uri)
        placed.add(r.uri)
        out.append(r)

    for r in regs:
        visit(r)
    return out


class Registry:
    def __init__(self, registrations: Iterable[Registration], config: Config) -> None:
        self.config = config
        disabled = set(config.disabled_plugins)
        self.plugins: list[Plugin] = [
            Plugin(r) for r in sort_registrations(registrations) if r.uri not in disabled
        ]
        # URIs whose init has not finished (set while init_all runs).
        self.pending: set[str] = set()

    async def init_all(self) -> None:
        """Initialise every plugin once all plugins of the types it requires have finished.

        Plugins that do not depend on each other initialise concurrently: the overlay check's
        mounts, the metadata migrations and the task manager's shim reconnects overlap instead
        of adding up. ``self.plugins`` keeps the sorted order for everything that lists them.
        """
        deps = dependencies(p.registration for p in self.plugins)
        self.pending = {p.registration.uri for p in self.plugins}
        started: dict[str, asyncio.Task[None]] = {}
        for p in self.plugins:  # sorted: every dependency's task exists already
            waits = [started[d.uri] for d in deps[p.registration.uri]]
            started[p.registration.uri] = asyncio.ensure_future(self._init_one(p, waits))
        await asyncio.gather(*started.values())
        failed_required = [
            p.registration.uri
            for p in self.plugins
            if p.registration.uri in set(self.config.required_plugins) and p.error is not None
        ]
        missing = set(self.config.required_plugins) - {p.registration.uri for p in self.plugins}
        if failed_required or missing:
            raise RuntimeError(
                f"required plugins failed to load: {', '.join(sorted([*failed_required, *missing]))}"
            )

    async def _init_one(self, p: Plugin, after: list[asyncio.Task[None]]) -> None:
        if after:
            await asyncio.wait(after)
        try:
            p.instance = await p.registration.init(InitContext(self, p))
            log.debug("loading plugin", id=p.registration.uri, type=p.registration.type)
        except SkipPlugin as exc:
            p.error = exc
            log.info("skip loading plugin", id=p.registration.uri, reason=str(exc))
        except Exception as exc:
            p.error = exc
            log.warning("failed to load plugin", id=p.registration.uri, error=str(exc))
        finally:
            self.pending.discard(p.registration.uri)

    def instances(self, type_: str) -> list[Any]:
        return [p.instance for p in self.plugins if p.registration.type == type_ and p.error is None]

    async def close_all(self) -> None:
        """Close plugins in reverse start order; each instance may offer ``async close()``."""
        for p in reversed(self.plugins):
            close = getattr(p.instance, "close", None)
            if close is None or p.error is not None:
                continue
            try:
                result = close()
                if hasattr(result, "__await__"):
                    await result
            except Exception as exc:
                log.warning("failed to close plugin", id=p.registration.uri, error=str(exc))
