from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pyctr.daemon import plugin
from pyctr.daemon.config import Config


def reg(type_: str, id_: str, requires: tuple[str, ...] = (), init: Any = None) -> plugin.Registration:
    async def default(ic: plugin.InitContext) -> str:
        return f"{type_}.{id_}"

    return plugin.Registration(type=type_, id=id_, init=init or default, requires=requires)


def test_requirements_come_first_and_order_is_stable() -> None:
    regs = [
        reg("grpc", "b", ("meta",)),
        reg("grpc", "a", ("meta", "event")),
        reg("meta", "db"),
        reg("event", "x"),
        reg("intro", "i", ("*",)),
    ]
    order = [r.uri for r in plugin.sort_registrations(regs)]
    assert order.index("meta.db") < order.index("grpc.b")
    assert order.index("event.x") < order.index("grpc.a")
    assert order[-1] == "intro.i"
    assert order.index("grpc.b") < order.index("grpc.a")


def test_cycles_and_duplicates_are_errors() -> None:
    with pytest.raises(ValueError, match="cycle"):
        plugin.sort_registrations([reg("a", "1", ("b",)), reg("b", "1", ("a",))])
    with pytest.raises(ValueError, match="registered twice"):
        plugin.sort_registrations([reg("a", "1"), reg("a", "1")])


def test_independent_plugins_initialise_concurrently_dependents_wait(tmp_path: object) -> None:
    """A slow init (the overlay check, shim reconnects) delays only the plugins that require it."""
    events: list[str] = []
    release = asyncio.Event()

    def step(name: str, wait: bool = False) -> Any:
        async def init(ic: plugin.InitContext) -> str:
            events.append(f"{name} start")
            if wait:
                await release.wait()
            if name == "other.fast":
                release.set()  # only reachable if slow.s does not hold everything up
            events.append(f"{name} done")
            return name

        return init

    cfg = Config(root=f"{tmp_path}/r", state=f"{tmp_path}/s")
    registry = plugin.Registry(
        [
            reg("slow", "s", init=step("slow.s", wait=True)),
            reg("other", "fast", init=step("other.fast")),
            reg("user", "u", ("slow",), init=step("user.u")),
            reg("intro", "i", ("*",), init=step("intro.i")),
        ],
        cfg,
    )
    asyncio.run(asyncio.wait_for(registry.init_all(), 5))
    assert events.index("other.fast done") < events.index("slow.s done")
    assert events.index("slow.s done") < events.index("user.u start")
    assert events[-2:] == ["intro.i start", "intro.i done"]
    # Listing order stays the sorted one, whatever order the inits finished in.
    assert [p.registration.uri for p in registry.plugins] == ["slow.s", "other.fast", "user.u", "intro.i"]
    assert [registry.instances(t) for t in ("slow", "user")] == [["slow.s"], ["user.u"]]


def test_using_a_plugin_not_required_is_an_error_not_a_none(tmp_path: object) -> None:
    """With concurrent inits an undeclared dependency may still be initialising: say so."""
    release = asyncio.Event()

    async def slow(ic: plugin.InitContext) -> str:
        await release.wait()
        return "slow"

    async def sneaky(ic: plugin.InitContext) -> Any:
        try:
            return ic.get("slow")
        finally:
            release.set()

    cfg = Config(root=f"{tmp_path}/r", state=f"{tmp_path}/s")
    registry = plugin.Registry([reg("slow", "s", init=slow), reg("user", "u", init=sneaky)], cfg)
    asyncio.run(asyncio.wait_for(registry.init_all(), 5))
    errors = {p.registration.uri: str(p.error) for p in registry.plugins}
    assert "add slow to its requires" in errors["user.u"]
    assert registry.instances("slow") == ["slow"]


def test_failures_are_recorded_and_propagate_to_dependents(tmp_path: object) -> None:
    async def broken(ic: plugin.InitContext) -> None:
        raise RuntimeError("disk on fire")

    async def needs_meta(ic: plugin.InitContext) -> Any:
        return ic.get("meta")

    async def skipped(ic: plugin.InitContext) -> None:
        raise plugin.SkipPlugin("no btrfs here")

    cfg = Config(root=f"{tmp_path}/r", state=f"{tmp_path}/s")
    registry = plugin.Registry(
        [
            reg("meta", "db", init=broken),
            reg("grpc", "x", ("meta",), init=needs_meta),
            reg("snap", "b", init=skipped),
        ],
        cfg,
    )
    asyncio.run(registry.init_all())
    errors = {p.registration.uri: str(p.error) for p in registry.plugins}
    assert errors["meta.db"] == "disk on fire"
    assert "meta.db failed: disk on fire" in errors["grpc.x"]
    assert errors["snap.b"].startswith("skip plugin")
    assert registry.instances("grpc") == []


def test_required_and_disabled_plugins(tmp_path: object) -> None:
    cfg = Config(
        root=f"{tmp_path}/r", state=f"{tmp_path}/s", disabled_plugins=["a.off"], required_plugins=["a.on"]
    )
    registry = plugin.Registry([reg("a", "on"), reg("a", "off")], cfg)
    asyncio.run(registry.init_all())
    assert [p.registration.uri for p in registry.plugins] == ["a.on"]

    cfg.required_plugins = ["a.missing"]
    registry = plugin.Registry([reg("a", "on")], cfg)
    with pytest.raises(RuntimeError, match=r"a\.missing"):
        asyncio.run(registry.init_all())


def test_plugin_config_merges_defaults_with_file(tmp_path: object) -> None:
    seen = {}

    async def init(ic: plugin.InitContext) -> None:
        seen.update(ic.plugin_config)
        seen["root"] = ic.root

    cfg = Config(root=f"{tmp_path}/r", state=f"{tmp_path}/s", plugins={"t.x": {"b": 3}})
    r = plugin.Registration(type="t", id="x", init=init, config={"a": 1, "b": 2})
    asyncio.run(plugin.Registry([r], cfg).init_all())
    assert seen == {"a": 1, "b": 3, "root": f"{tmp_path}/r/t.x"}
