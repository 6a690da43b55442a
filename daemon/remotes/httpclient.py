"""The HTTP/1.1 client under the registry client: asyncio streams, a keep-alive pool, TLS, proxies.

A registry speaks a small part of HTTP: GET and HEAD of manifests and blobs, POST/PUT of uploads,
token requests. aiohttp did this for us, but importing it took ~145 ms, paid by the first pull of
every daemon (more than the whole pull of a small image); this module needs only what asyncio and
ssl have loaded already.

    request    <METHOD> <path?query> HTTP/1.1 (absolute-form through an http proxy), Host,
               Content-Length for bytes and form bodies, Transfer-Encoding: chunked for a
               streamed body of unknown length
    response   status line, headers (at most 64 KiB), then a body framed by Content-Length,
               chunked encoding, or the end of the connection; none for HEAD, 1xx, 204 and 304
    pool       idle connections per (scheme, host, port, proxy, TLS context), at most
               ``limit_per_host`` in use at once per key; a connection goes back to the pool only
               when its body was read to the end and neither side asked to close it. A request on
               a reused connection that the server had closed meanwhile is sent again on a new
               one (if its body can be replayed).
    https      the TLS context given, else one verifying context for the process (made on first
               use: plain-HTTP registries never pay for loading the system roots)
    proxies    http: the request goes to the proxy with the absolute URL; https: CONNECT
               host:port, then TLS to the registry through the tunnel. ``user:pass@`` in the
               proxy URL becomes Proxy-Authorization (Basic).

Failures are :class:`HTTPError` (:class:`TLSError` for certificate and handshake failures) or
``TimeoutError`` (connect: ``connect_timeout``; any single read: ``read_timeout``).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

MAX_HEAD = 64 << 10
_NO_BODY_STATUS = frozenset({204, 304})
_default_ssl: ssl.SSLContext | None = None


class HTTPError(Exception):
    """A transport failure: connecting, sending, or a malformed or cut-short response."""


class TLSError(HTTPError):
    """A TLS handshake or certificate verification failure."""


def default_ssl_context() -> ssl.SSLContext:
    """The verifying context for https without host-specific TLS settings (one per process)."""
    global _default_ssl
    if _default_ssl is None:
        _default_ssl = ssl.create_default_context()
    return _default_ssl


# -- URLs (kept as strings; these are the few operations the registry client needs) ------------


def origin(url: str) -> str:
    """``scheme://host[:port]``, lower-cased, default ports left out."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def update_query(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` set in its query (replacing keys already there)."""
    if not params:
        return url
    base, _, query = url.partition("?")
    merged = dict(parse_qsl(query, keep_blank_values=True))
    merged.update(params)
    return f"{base}?{urlencode(merged)}"


def extend_query(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` appended to its query, which is kept byte for byte."""
    base, sep, query = url.partition("?")
    extra = urlencode(dict(params))
    return f"{base}?{query}&{extra}" if sep and query else f"{base}?{extra}"


# -- responses -------------------------------------------------------------------------------------


class Headers:
    """Response headers: case-insensitive names, repeated headers kept."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._by_name: dict[str, list[str]] = {}
        for k, v in items:
            self._by_name.setdefault(k.lower(), []).append(v)

    def get(self, name: str, default: Any = None) -> Any:
        values = self._by_name.get(name.lower())
        return values[0] if values else default

    def getall(self, name: str, default: Any = None) -> Any:
        return list(self._by_name.get(name.lower(), [])) or default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_name

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


class _Conn:
    def __init__(
        self, key: tuple[Any, ...], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        self.writer.close()


class Response:
    def __init__(
        self,
        client: Client,
        conn: _Conn,
        method: str,
        url: str,
        status: int,
        reason: str,
        headers: Headers,
        keep_alive: bool,
    ) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self.method = method
        self.url = url
        self.status = status
        self.reason = reason
        self.headers = headers
        self._keep_alive = keep_alive
        length = headers.get("Content-Length")
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.content_length: int | None = None
        if length is not None and not chunked:
            try:
                self.content_length = int(length)
            except ValueError:
                raise HTTPError(f"bad Content-Length {length!r}") from None
        ctype = headers.get("Content-Type", "")
        self.content_type = ctype.split(";", 1)[0].strip().lower() if ctype else "application/octet-stream"
        self._chunked = chunked
        self._left = self.content_length  # None: chunked or to the end of the connection
        self._chunk_left = 0
        self._eof = method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200
        if not self._eof and self._left == 0:
            self._eof = True
        if self._eof:
            self.release()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the connection back (body read to the end) or close it (anything left unread)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._eof and self._keep_alive:
            self._client._put_back(conn)
        else:
            self._client._discard(conn)

    async def _read_some(self, n: int) -> bytes:
        reader = self._conn.reader if self._conn is not None else None
        if reader is None or self._eof:
            return b""
        timeout = self._client.read_timeout
        try:
            async with asyncio.timeout(timeout):
                if self._chunked:
                    if self._chunk_left == 0:
                        line = await reader.readuntil(b"\r\n")
                        size = int(line.split(b";", 1)[0].strip(), 16)
                        if size == 0:
                            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                                pass  # trailers
                            self._eof = True
                            self.release()
                            return b""
                        self._chunk_left = size
                    data = await reader.read(min(n, self._chunk_left))
                    if not data:
                        raise HTTPError("connection closed in a chunk")
                    self._chunk_left -= len(data)
                    if self._chunk_left == 0:
                        await reader.readexactly(2)
                    return data
                if self._left is None:
                    data = await reader.read(n)
                    if not data:
                        self._eof = True
                        self._keep_alive = False
                        self.release()
                    return data
                data = await reader.read(min(n, self._left))
                if not data:
                    raise HTTPError(f"connection closed with {self._left} bytes of the body unread")
                self._left -= len(data)
                if self._left == 0:
                    self._eof = True
                    self.release()
                return data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self._keep_alive = False
            self.release()
            raise HTTPError(f"reading the response from {origin(self.url)}: {e or type(e).__name__}") from e
        except BaseException:
            self._keep_alive = False
            self.release()
            raise

    async def read(self, limit: int = -1) -> bytes:
        """The body (at most ``limit`` bytes when given)."""
        parts: list[bytes] = []
        have = 0
        while limit < 0 or have < limit:
            piece = await self._read_some(
                self._client.read_bufsize if limit < 0 else min(limit - have, 1 << 20)
            )
            if not piece:
                break
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in the pieces that arrive (up to ``read_bufsize`` each)."""
        while piece := await self._read_some(self._client.read_bufsize):
            yield piece


# -- the client ------------------------------------------------------------------------------------


class Client:
    def __init__(
        self,
        *,
        connect_timeout: float = 30.0,
        read_timeout: float = 120.0,
        read_bufsize: int = 256 << 10,
        limit_per_host: int = 16,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.read_bufsize = read_bufsize
        self.limit_per_host = limit_per_host
        self._idle: dict[tuple[Any, ...], list[_Conn]] = {}
        self._slots: dict[tuple[Any, ...], asyncio.Semaphore] = {}
        self._busy: set[_Conn] = set()
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
        for c in list(self._busy):
            c.close()
        self._busy.clear()

    def _put_back(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        self._slots[conn.key].release()
        if self.closed or conn.writer.is_closing():
            conn.close()
            return
        conn.reused = True
        self._idle.setdefault(conn.key, []).append(conn)

    def _discard(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        self._slots[conn.key].release()
        conn.close()

    async def _connect(
        self,
        key: tuple[Any, ...],
        scheme: str,
        host: str,
        port: int,
        sslctx: ssl.SSLContext | None,
        proxy: str | None,
    ) -> _Conn:
        slot = self._slots.setdefault(key, asyncio.Semaphore(self.limit_per_host))
        await slot.acquire()
        try:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if not conn.writer.is_closing() and not conn.reader.at_eof():
                    self._busy.add(conn)
                    return conn
                conn.close()
            conn = await self._open(key, scheme, host, port, sslctx, proxy)
        except BaseException:
            slot.release()
            raise
        self._busy.add(conn)
        return conn

    async def _open(
        self,
        key: tuple[Any, ...],
        scheme: str,
        host: str,
        port: int,
        sslctx: ssl.SSLContext | None,
        proxy: str | None,
    ) -> _Conn:
        tls = sslctx if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_HEAD
                    )
                else:
                    p = urlsplit(proxy)
                    reader, writer = await asyncio.open_connection(
                        p.hostname, p.port or (443 if p.scheme == "https" else 80), limit=MAX_HEAD
                    )
                    if tls is not None:
                        await self._tunnel(reader, writer, host, port, proxy)
                        await writer.start_tls(tls, server_hostname=host)
        except (ssl.SSLError, ssl.CertificateError) as e:
            raise TLSError(f"{host}:{port}: {e}") from e
        except OSError as e:
            raise HTTPError(f"connecting to {host}:{port}: {e.strerror or e}") from e
        return _Conn(key, reader, writer)

    async def _tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, proxy: str
    ) -> None:
        target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", *_proxy_auth(proxy)]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status, reason, _ = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if status != 200:
            writer.close()
            raise HTTPError(f"proxy CONNECT to {target}: {status} {reason}")

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
    ) -> Response:
        """Send one request (no redirects followed) and return its response, body unread.

        ``data``: None, bytes, a mapping (sent as a form), or an async iterator of bytes (sent as
        it comes: with the caller's Content-Length, else chunked)."""
        if self.closed:
            raise HTTPError("client closed")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise HTTPError(f"unsupported URL {url!r}")
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
        sslctx = (ssl_context or default_ssl_context()) if scheme == "https" else None
        key = (scheme, host, port, proxy, id(sslctx))
        hdrs = dict(headers or {})
        lower = {k.lower() for k in hdrs}
        if isinstance(data, Mapping):
            data = urlencode(dict(data)).encode()
            if "content-type" not in lower:
                hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        streamed = data is not None and not isinstance(data, bytes | bytearray | memoryview)
        if not streamed:
            if data is not None or method in ("POST", "PUT", "PATCH"):
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "content-length"}
                hdrs["Content-Length"] = str(len(data) if data is not None else 0)
        elif "content-length" not in lower:
            hdrs["Transfer-Encoding"] = "chunked"
        netloc = parts.netloc.rsplit("@", 1)[-1]
        target = url.split("#", 1)[0] if proxy is not None and scheme == "http" else (parts.path or "/")
        if not (proxy is not None and scheme == "http") and parts.query:
            target += "?" + parts.query
        lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
        lines += [f"{k}: {v}" for k, v in hdrs.items() if k.lower() != "host"]
        if proxy is not None and scheme == "http":
            lines += _proxy_auth(proxy)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in range(2):
            conn = await self._connect(key, scheme, host, port, sslctx, proxy)
            reused = conn.reused
            try:
                await self._send(conn, head, data, streamed, "chunked" in hdrs.get("Transfer-Encoding", ""))
                async with asyncio.timeout(self.read_timeout):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                status, reason, items = _parse_head(raw)
                while 100 <= status < 200 and status != 101:  # interim responses: read on
                    async with asyncio.timeout(self.read_timeout):
                        raw = await conn.reader.readuntil(b"\r\n\r\n")
                    status, reason, items = _parse_head(raw)
            except asyncio.IncompleteReadError as e:
                self._discard(conn)
                if reused and not e.partial and attempt == 0 and not streamed:
                    continue  # the server had closed the idle connection: once more, on a new one
                raise HTTPError(f"{origin(url)}: connection closed before a response") from e
            except (OSError, asyncio.LimitOverrunError, ValueError) as e:
                self._discard(conn)
                if reused and attempt == 0 and not streamed and isinstance(e, ConnectionError):
                    continue
                raise HTTPError(f"{origin(url)}: {e or type(e).__name__}") from e
            except BaseException:
                self._discard(conn)
                raise
            response_headers = Headers(items)
            keep_alive = "close" not in response_headers.get("Connection", "").lower() and not raw.startswith(
                b"HTTP/1.0"
            )
            return Response(self, conn, method, url, status, reason, response_headers, keep_alive)
        raise HTTPError(f"{origin(url)}: connection closed before a response")  # pragma: no cover

    async def _send(self, conn: _Conn, head: bytes, data: Any, streamed: bool, chunked: bool) -> None:
        writer = conn.writer
        if not streamed:
            body = bytes(data) if data is not None else b""
            writer.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                view = memoryview(body)
                for i in range(0, len(view), 1 << 20):
                    writer.write(view[i : i + (1 << 20)])
                    await writer.drain()
            await writer.drain()
            return
        writer.write(head)
        async for piece in data:
            if not piece:
                continue
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()


def _proxy_auth(proxy: str) -> list[str]:
    p = urlsplit(proxy)
    if p.username is None:
        return []
    token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
    return [f"Proxy-Authorization: Basic {token}"]


def _parse_head(raw: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"bad status line {lines[0][:100]!r}")
    items: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and items:  # obsolete line folding
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line {line[:100]!r}")
        items.append((name.strip(), value.strip()))
    return int(code), reason, items


# -- proxies from the environment (urllib.request's rules, without importing it) -------------------


def proxies_from_environment() -> dict[str, str]:
    """``<scheme>_proxy`` variables (lower case wins over upper case; ``no_proxy`` as "no")."""
    import os

    proxies: dict[str, str] = {}
    for name, value in os.environ.items():
        if value and name[-6:].lower() == "_proxy":
            proxies[name[:-6].lower()] = value
    if "REQUEST_METHOD" in os.environ:
        proxies.pop("http", None)  # a CGI request can set HTTP_PROXY through a "Proxy:" header
    for name, value in os.environ.items():
        if name[-6:] == "_proxy":
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return proxies


def proxy_bypass(host: str, proxies: Mapping[str, str]) -> bool:
    """Whether ``host`` is in ``no_proxy`` ("*", names, ``.suffix``es, optionally with a port)."""
    no_proxy = proxies.get("no", "")
    if no_proxy == "*":
        return True
    host = host.lower()
    hostonly = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if not name:
            continue
        if name in (hostonly, host):
            return True
        if hostonly.endswith("." + name) or host.endswith("." + name):
            return True
    return False
