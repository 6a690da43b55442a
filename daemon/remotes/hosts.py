"""Per-registry host configuration with containerd's ``hosts.toml`` semantics.

Which directory: for a domain ``host:port`` the first of these that exists is used, and only that
one (files are never merged across directories)::

    <config_dir>/host_port_/      (":port" spelled "_port_", as containerd writes it)
    <config_dir>/host:port/
    <config_dir>/_default/

In that directory ``hosts.toml`` lists the endpoints. Every ``[host."<url>"]`` table is a mirror,
tried in file order; the top-level ``server`` (with the top-level keys as its settings) comes
last. Without ``server`` the last entry is the domain's default endpoint: docker.io ->
``https://registry-1.docker.io``; localhost, 127.0.0.0/8 and ::1 -> plain http (TLS verification
skipped should a caller force https); anything else -> https, or http when ``plain_http``. A URL
without a scheme is https. A path is kept and gets ``/v2`` appended unless it ends with it or
``override_path = true``. Keys per endpoint::

    capabilities = ["pull", "resolve", "push"]   # default: all three
    ca = "ca.crt" | ["a.crt", "b.crt"]           # relative to the directory
    client = "both.pem" | ["c.cert", ...] | [["c.cert", "c.key"], ...]
    skip_verify = true
    header = { "x-name" = "v" | ["v1", "v2"] }   # lists are joined with ", "
    override_path = true

A directory without ``hosts.toml`` (or with one that fails to parse, as containerd tolerates)
is read Docker's way: ``*.crt`` are CA files, ``*.cert`` client certificates with a matching
``*.key`` when one exists; the one endpoint is the domain's default.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pyctr.api.errdefs import InvalidArgument
from pyctr.api.log import get_logger

log = get_logger("pyctrd.remotes")

CAPABILITIES = frozenset({"pull", "resolve", "push"})
DOCKER_HUB_HOST = "registry-1.docker.io"


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint to try for a domain."""

    host: str  # "registry-1.docker.io", "127.0.0.1:5000", "[::1]:5000"
    scheme: str  # "http" | "https"
    path: str = "/v2"
    capabilities: frozenset[str] = CAPABILITIES
    ca_files: tuple[str, ...] = ()
    # (certificate, key); key "" means the key is in the certificate file. Only the first pair
    # of a ``client`` list is kept: one TLS context presents one client chain.
    client_cert: tuple[str, str] | None = None
    skip_verify: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"


def is_localhost(domain: str) -> bool:
    """localhost or a loopback address, with or without a port (containerd's IsLocalhost)."""
    host = split_host_port(domain)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(domain: str) -> tuple[str, str]:
    """("::1", "5000") for "[::1]:5000"; ("example.com", "") for "example.com"."""
    if domain.startswith("["):
        end = domain.find("]")
        if end < 0:
            return domain, ""
        return domain[1:end], domain[end + 2 :] if domain[end + 1 : end + 2] == ":" else ""
    if domain.count(":") == 1:
        host, port = domain.split(":")
        return host, port
    return domain, ""


def host_dir(config_dir: str, domain: str) -> str | None:
    """The one directory that configures ``domain``, or None."""
    candidates = []
    idx = domain.rfind(":")
    if idx > 0:
        candidates.append(os.path.join(config_dir, f"{domain[:idx]}_{domain[idx + 1 :]}_"))
    candidates += [os.path.join(config_dir, domain), os.path.join(config_dir, "_default")]
    for path in candidates:
        if os.path.isdir(path):
            return path
    return None


def _abs(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _strings(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(f"hosts.toml: invalid type for {what!r}: {value!r}")


@dataclass
class _Entry:
    """One parsed endpoint; ``host`` is "" for the default endpoint to be filled in later."""

    host: str = ""
    scheme: str = ""
    path: str = "/v2"
    capabilities: frozenset[str] = CAPABILITIES
    ca_files: tuple[str, ...] = ()
    client_cert: tuple[str, str] | None = None
    skip_verify: bool | None = None  # None: not said, so the default for the domain applies
    headers: dict[str, str] = field(default_factory=dict)


def _parse_entry(server: str, base: str, cfg: dict[str, Any]) -> _Entry:
    entry = _Entry()
    if server:
        if not server.startswith("http"):
            server = "https://" + server
        u = urlsplit(server)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise InvalidArgument(f"hosts.toml: unable to parse server {server!r}")
        entry.scheme, entry.host = u.scheme, u.netloc
        path = os.path.normpath(u.path) if u.path else ""
        override = bool(cfg.get("override_path", False))
        if path in ("", "/", "."):
            path = "" if override else "/v2"
        elif not path.endswith("/v2") and not override:
            path += "/v2"
        entry.path = path
    caps = cfg.get("capabilities")
    if caps:
        names = {c.lower() for c in _strings(caps, "capabilities")}
        unknown = names - CAPABILITIES
        if unknown:
            raise InvalidArgument(f"hosts.toml: unknown capability {sorted(unknown)[0]!r}")
        entry.capabilities = frozenset(names)
    if "skip_verify" in cfg:
        entry.skip_verify = bool(cfg["skip_verify"])
    if "ca" in cfg:
        entry.ca_files = tuple(_abs(p, base) for p in _strings(cfg["ca"], "ca"))
    client = cfg.get("client")
    if client is not None:
        pairs: list[tuple[str, str]] = []
        for item in [client] if isinstance(client, str) else client:
            if isinstance(item, str):
                pairs.append((_abs(item, base), ""))
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
                pairs.append((_abs(item[0], base), _abs(item[1], base)))
            else:
                raise InvalidArgument(f"hosts.toml: invalid client pair {item!r}")
        entry.client_cert = pairs[0] if pairs else None
    for key, value in (cfg.get("header") or {}).items():
        entry.headers[key] = ", ".join(_strings(value, f"header {key}"))
    return entry


def parse_hosts_toml(text: str, base_dir: str) -> list[_Entry]:
    """Endpoints of one hosts.toml: mirrors in file order, then the server (maybe unnamed)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"hosts.toml: {e}") from e
    # tomllib keeps tables in file order, which is the order mirrors are tried in.
    mirrors = doc.get("host") or {}
    if not isinstance(mirrors, dict):
        raise InvalidArgument("hosts.toml: invalid `host` tree")
    entries = [_parse_entry(url, base_dir, cfg) for url, cfg in mirrors.items()]
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    entries.append(_parse_entry(str(doc.get("server", "")), base_dir, top))
    return entries


def _cert_files(directory: str) -> list[_Entry]:
    """Docker's certs.d layout: one default endpoint with the CA and client files found."""
    entry = _Entry()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    cas = [os.path.join(directory, n) for n in names if n.endswith(".crt")]
    entry.ca_files = tuple(cas)
    for n in names:
        if n.endswith(".cert"):
            key = os.path.join(directory, n[: -len(".cert")] + ".key")
            entry.client_cert = (os.path.join(directory, n), key if os.path.exists(key) else "")
            break
    return [entry]


def _load_dir(directory: str) -> list[_Entry]:
    try:
        with open(os.path.join(directory, "hosts.toml")) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if not text:
        return _cert_files(directory)
    try:
        return parse_hosts_toml(text, directory)
    except InvalidArgument as e:
        # containerd logs and falls back to the certificate files rather than failing pulls.
        log.error("failed to decode hosts.toml", dir=directory, error=str(e))
        return _cert_files(directory)


def hosts_for(domain: str, *, config_dir: str | None = None, plain_http: bool = False) -> list[RegistryHost]:
    """The endpoints to try for ``domain``, in order (mirrors first, the server last)."""
    entries: list[_Entry] = []
    if config_dir:
        directory = host_dir(config_dir, domain)
        if directory:
            entries = _load_dir(directory)
    if not entries:
        entries = [_Entry()]
    last = entries[-1]
    if not last.host:
        last.path = "/v2"
        if domain == "docker.io":
            last.scheme, last.host = "https", DOCKER_HUB_HOST
        elif is_localhost(domain):
            last.host = domain
            last.scheme = "http"
            if last.skip_verify is None:
                last.skip_verify = True  # as containerd does for localhost
        else:
            last.host = domain
            last.scheme = "http" if plain_http else "https"
    return [
        RegistryHost(
            host=e.host,
            scheme=e.scheme,
            path=e.path,
            capabilities=e.capabilities,
            ca_files=e.ca_files,
            client_cert=e.client_cert,
            skip_verify=bool(e.skip_verify),
            headers=dict(e.headers),
        )
        for e in entries
    ]
