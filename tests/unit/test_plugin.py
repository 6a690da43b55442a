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
