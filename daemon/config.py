"""pyctrd's configuration: containerd's TOML layout (version 2), with pyctrd's own paths.

Precedence: built-in defaults < the config file < command-line flags. ``pyctrd config default``
prints the defaults, including every plugin's own table, so the output is a complete file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ROOT = "/var/lib/pyctrd"
DEFAULT_STATE = "/run/pyctrd"
DEFAULT_ADDRESS = "/run/pyctrd/pyctrd.sock"
DEFAULT_CONFIG_PATH = "/etc/pyctrd/config.toml"
MAX_MESSAGE_SIZE = 16 << 20


class ConfigError(ValueError):
    pass


@dataclass
class GRPCConfig:
    address: str = DEFAULT_ADDRESS
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = MAX_MESSAGE_SIZE
    max_send_message_size: int = MAX_MESSAGE_SIZE


@dataclass
class TTRPCConfig:
    # Empty means "<grpc address>.ttrpc", as containerd does.
    address: str = ""
    uid: int = 0
    gid: int = 0


@dataclass
class DebugConfig:
    level: str = "info"
    format: str = ""  # "json", "console", or "" for JSON unless stderr is a terminal


@dataclass
class Config:
    version: int = 2
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    disabled_plugins: list[str] = field(default_factory=list)
    required_plugins: list[str] = field(default_factory=list)
    grpc: GRPCConfig = field(default_factory=GRPCConfig)
    ttrpc: TTRPCConfig = field(default_factory=TTRPCConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    timeouts: dict[str, str] = field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ttrpc_address(self) -> str:
        return self.ttrpc.address or self.grpc.address + ".ttrpc"


_SECTIONS = {"grpc": GRPCConfig, "ttrpc": TTRPCConfig, "debug": DebugConfig}
_TOP = {"version", "root", "state", "disabled_plugins", "required_plugins", "timeouts", "plugins"}


def from_dict(data: Mapping[str, Any]) -> Config:
    cfg = Config()
    unknown = set(data) - _TOP - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    version = data.get("version", 2)
    if version != 2:
        raise ConfigError(f"unsupported config version {version!r}: only version 2 is understood")
    for key in ("root", "state"):
        if key in data:
            setattr(cfg, key, _typed(data[key], str, key))
    for key in ("disabled_plugins", "required_plugins"):
        if key in data:
            setattr(cfg, key, [_typed(v, str, key) for v in _typed(data[key], list, key)])
    if "timeouts" in data:
        cfg.timeouts = {str(k): str(v) for k, v in _typed(data["timeouts"], dict, "timeouts").items()}
    if "plugins" in data:
        cfg.plugins = {str(k): dict(v) for k, v in _typed(data["plugins"], dict, "plugins").items()}
    for name, cls in _SECTIONS.items():
        section = _typed(data.get(name, {}), dict, name)
        obj = getattr(cfg, name)
        for k, v in section.items():
            if not hasattr(obj, k):
                raise ConfigError(f"unknown key {name}.{k}")
            default = getattr(cls(), k)
            setattr(obj, k, _typed(v, type(default), f"{name}.{k}"))
    return cfg


def _typed(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{what}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return from_dict(data)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        # An inline table; keys are quoted since runtime names and the like contain dots.
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: Config, plugin_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Render a configuration as TOML, with each plugin's defaults under [plugins]."""
    lines = [
        f"version = {cfg.version}",
        f"root = {_toml_value(cfg.root)}",
        f"state = {_toml_value(cfg.state)}",
        f"disabled_plugins = {_toml_value(cfg.disabled_plugins)}",
        f"required_plugins = {_toml_value(cfg.required_plugins)}",
    ]
    for name in _SECTIONS:
        lines += ["", f"[{name}]"]
        for k, v in vars(getattr(cfg, name)).items():
            lines.append(f"  {k} = {_toml_value(v)}")
    lines += ["", "[timeouts]"]
    for k, v in sorted(cfg.timeouts.items()):
        lines.append(f"  {_toml_value(k)} = {_toml_value(v)}")
    plugins = {k: dict(v) for k, v in (plugin_defaults or {}).items()}
    for k, v in cfg.plugins.items():
        plugins.setdefault(k, {}).update(v)
    lines += ["", "[plugins]"]
    for uri in sorted(plugins):
        lines.append(f"  [plugins.{_toml_value(uri)}]")
        for k, v in sorted(plugins[uri].items()):
            lines.append(f"    {k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
