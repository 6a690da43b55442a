"""The OCI distribution client the Transfer service pulls and pushes with.

Requests (``/v2`` is the endpoint's path from hosts.toml, ``<name>`` the repository path)::

    resolve       HEAD /v2/<name>/manifests/<tag|digest>   Accept: the four manifest types, */*
                  (GET the same when HEAD lacks Docker-Content-Digest, Content-Length or a known
                  Content-Type; the digest is then computed from the body)
    fetch         GET  /v2/<name>/manifests/<digest>  or  /blobs/<digest>   [Range: bytes=N-]
    push_blob     HEAD /v2/<name>/blobs/<digest>      (200: already there, done)
                  POST /v2/<name>/blobs/uploads/      -> 202 Location (201: mounted, done)
                  PUT  <Location>&digest=<digest>     the whole blob, streamed (201)
    push_manifest HEAD /v2/<name>/manifests/<tag|digest>   (200 naming the same digest: done)
                  PUT  /v2/<name>/manifests/<tag|digest>   Content-Type: the media type (201)

Both push calls return whether they uploaded anything: False means the registry had it already
(what a pusher reports as "already exists", as containerd's does).

Endpoints come from ``hosts.hosts_for`` and are tried in order for resolve and pull (404 and
failures move on to the next; the first failure that is not a 404 is what is reported if none
has the object); push uses the first endpoint with the push capability. Requests to a mirror
carry ``?ns=<domain>`` as containerd's do.

Connections: one pooled HTTP/1.1 client (httpclient.Client, at most 16 per host); 30 s to connect, no total limit
(blobs can be large) but a read that stalls for 120 s counts as a dropped connection. Idempotent
requests are retried ``max_retries`` times on network errors and 408/429/5xx with a short
exponential pause (honouring a small Retry-After). A blob stream that breaks resumes with
``Range: bytes=<received>-`` on the same endpoint. Redirects are followed by hand (at most 10) so
that ``Authorization`` is only ever sent to the registry's own origin: S3-style 307s to another
host go without it. ``Accept-Encoding: identity`` keeps sizes and ranges about the real bytes.
Environment proxies (HTTP(S)_PROXY, NO_PROXY) apply, never to loopback addresses.

Authentication: see :mod:`pyctr.daemon.remotes.auth` for the flow.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

from pyctr.api import digest as digestmod
from pyctr.api.errdefs import (
    ContainerdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedErr,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from pyctr.api.log import get_logger
from pyctr.daemon.remotes import errors
from pyctr.daemon.remotes.auth import Authorizer, CredentialsFunc, TokenRequest
from pyctr.daemon.remotes.hosts import RegistryHost, hosts_for, is_localhost
from pyctr.daemon.remotes.httpclient import (
    Client,
    HTTPError,
    Response,
    TLSError,
    extend_query,
    host_of,
    origin,
    proxies_from_environment,
    proxy_bypass,
    scheme_of,
    update_query,
)
from pyctr.daemon.remotes.reference import Reference

log = get_logger("pyctrd.remotes")

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST)
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
# */* last, as containerd sends it: a registry that has only some other type still answers, and
# we can then say what it is (schema 1: not implemented) instead of a bare 404.
ACCEPT = ", ".join((*MANIFEST_TYPES, "*/*"))

CHUNK = 1 << 20  # what fetch() yields at least, but for the last piece
MAX_MANIFEST = 16 << 20  # the largest manifest resolve() will read to compute a digest
MAX_REDIRECTS = 10
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0  # a read that stalls this long is a dropped connection (and is resumed)
MAX_RETRY_AFTER = 10.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor, as index and manifest entries carry it."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None  # os, architecture, variant, … of an index entry
    urls: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Descriptor:
        try:
            return cls(
                media_type=str(d.get("mediaType", "")),
                digest=digestmod.validate(str(d["digest"])),
                size=int(d["size"]),
                annotations={str(k): str(v) for k, v in (d.get("annotations") or {}).items()},
                platform=dict(d["platform"]) if d.get("platform") else None,
                urls=tuple(str(u) for u in d.get("urls") or ()),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"invalid descriptor {dict(d)!r}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.urls:
            out["urls"] = list(self.urls)
        return out


def media_type_of(body: bytes) -> str:
    """The media type a manifest body declares or, lacking ``mediaType``, its shape implies."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"manifest is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidArgument("manifest is not a JSON object")
    if doc.get("schemaVersion") == 1:
        return "application/vnd.docker.distribution.manifest.v1+prettyjws"
    if isinstance(doc.get("mediaType"), str) and doc["mediaType"]:
        return str(doc["mediaType"])
    if "manifests" in doc:
        return MT_OCI_INDEX
    if "config" in doc or "layers" in doc:
        return MT_OCI_MANIFEST
    raise InvalidArgument("unknown manifest type")


def children(media_type: str, body: bytes) -> list[Descriptor]:
    """What an index (its manifests) or a manifest (config, then layers) refers to."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{media_type} is not JSON: {e}") from e
    if media_type in INDEX_TYPES:
        return [Descriptor.from_dict(d) for d in doc.get("manifests") or ()]
    if media_type in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST):
        out = [Descriptor.from_dict(doc["config"])] if doc.get("config") else []
        return out + [Descriptor.from_dict(d) for d in doc.get("layers") or ()]
    return []


def _check_not_schema1(media_type: str, ref: Reference) -> None:
    if media_type in SCHEMA1_TYPES:
        raise NotImplementedErr(
            f"{ref}: Docker Image Format v1 and Docker Image manifest version 2, schema 1 are not supported"
        )


def _is_proxy(host: str, domain: str) -> bool:
    if domain == "docker.io":
        return host != "registry-1.docker.io"
    return host != domain


def _backoff(attempt: int) -> float:
    return min(0.1 * (2 ** (attempt - 1)), 2.0)


def _retry_after(resp: Response, attempt: int) -> float:
    try:
        return min(max(float(resp.headers.get("Retry-After", "")), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return _backoff(attempt)


async def _error_body(resp: Response) -> bytes:
    if resp.method == "HEAD":
        return b""
    try:
        return await resp.read(errors.MAX_ERROR_BODY)
    except (HTTPError, TimeoutError):
        return b""


async def _digest_of(data: bytes, algorithm: str = "sha256") -> str:
    # Hashing megabytes is blocking work: a thread keeps the loop answering meanwhile.
    if len(data) > 256 << 10:
        return await asyncio.to_thread(digestmod.of, data, algorithm)
    return digestmod.of(data, algorithm)


async def _verify(data: bytes, desc: Descriptor, what: str) -> None:
    if desc.size >= 0 and len(data) != desc.size:
        raise FailedPrecondition(f"digest mismatch: {what}: size {len(data)}, expected {desc.size}")
    alg, _ = digestmod.parse(desc.digest)
    got = await _digest_of(data, alg)
    if got != desc.digest:
        raise FailedPrecondition(f"digest mismatch: {what}: got {got}, expected {desc.digest}")


class _CountingBody:
    """An upload body that stops the request if the source yields more or fewer bytes than the
    descriptor says (the registry would otherwise wait for the rest, or take a short blob)."""

    def __init__(self, source: AsyncIterator[bytes], size: int, what: str) -> None:
        self.source, self.size, self.what = source, size, what
        self.sent = 0
        self.error: ContainerdError | None = None

    async def stream(self) -> AsyncIterator[bytes]:
        async for piece in self.source:
            self.sent += len(piece)
            if self.size >= 0 and self.sent > self.size:
                self.error = FailedPrecondition(f"{self.what}: source has more than {self.size} bytes")
                raise self.error
            yield piece
        if self.size >= 0 and self.sent != self.size:
            self.error = FailedPrecondition(
                f"{self.what}: source has {self.sent} bytes, expected {self.size}"
            )
            raise self.error


class RegistryClient:
    """A pooled, authenticating client for OCI distribution registries (see the module doc)."""

    def __init__(
        self,
        *,
        credentials: CredentialsFunc | None = None,
        config_dir: str | None = None,
        plain_http: bool = False,
        headers: dict[str, str] | None = None,
        user_agent: str = "pyctr/0.1",
        max_retries: int = 3,
        session: Client | None = None,
    ) -> None:
        """One client per set of credentials (tokens are cached in it). ``session`` shares a
        connection pool between clients; it is the caller's to close."""
        self.config_dir = config_dir
        self.plain_http = plain_http
        self.max_retries = max_retries
        self._headers = {"User-Agent": user_agent, "Accept-Encoding": "identity", **(headers or {})}
        self._auth = Authorizer(credentials, self._fetch_token)
        self._session = session
        self._own_session = session is None
        self._ssl: dict[tuple[Any, ...], ssl.SSLContext] = {}
        self._ssl_by_origin: dict[str, ssl.SSLContext | None] = {}
        # Read once: the proxy settings of the daemon's environment do not change while it runs.
        self._proxies = proxies_from_environment()

    @property
    def authorizer(self) -> Authorizer:
        return self._auth

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def hosts(self, domain: str) -> list[RegistryHost]:
        """The endpoints for ``domain``; hosts.toml is read on every call, as containerd does."""
        return hosts_for(domain, config_dir=self.config_dir, plain_http=self.plain_http)

    # ---------------------------------------------------------------------------- transport

    def _get_session(self) -> Client:
        if self._session is None or self._session.closed:
            self._own_session = True
            self._session = Client(
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                # Bigger reads mean fewer, larger pieces for fetch() to join.
                read_bufsize=256 << 10,
                limit_per_host=16,
            )
        return self._session

    def _ssl_for(self, host: RegistryHost) -> ssl.SSLContext | None:
        if host.scheme != "https" or not (host.ca_files or host.client_cert or host.skip_verify):
            return None  # the client's verifying default context
        key = (host.ca_files, host.client_cert, host.skip_verify)
        ctx = self._ssl.get(key)
        if ctx is None:
            # The system roots stay trusted and the configured CAs are added, as containerd does.
            ctx = ssl.create_default_context()
            try:
                for ca in host.ca_files:
                    ctx.load_verify_locations(cafile=ca)
                if host.client_cert:
                    ctx.load_cert_chain(host.client_cert[0], host.client_cert[1] or None)
            except (OSError, ssl.SSLError) as e:
                raise FailedPrecondition(f"tls configuration for {host.host}: {e}") from e
            if host.skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl[key] = ctx
        self._ssl_by_origin[origin(host.base_url)] = ctx
        return ctx

    def _proxy(self, url: str) -> str | None:
        host = host_of(url)
        if not self._proxies or is_localhost(host):
            return None
        if proxy_bypass(host, self._proxies):
            return None
        return self._proxies.get(scheme_of(url))

    async def _send_following(
        self,
        host: RegistryHost,
        method: str,
        url: str,
        headers: dict[str, str],
        authorization: str | None,
        data: Any,
    ) -> Response:
        """One request, redirects followed; Authorization only for the registry's own origin."""
        session = self._get_session()
        registry_origin = origin(host.base_url)
        for _ in range(MAX_REDIRECTS + 1):
            same = origin(url) == registry_origin
            hdrs = dict(headers)
            if authorization and same:
                hdrs["Authorization"] = authorization
            resp = await session.request(
                method,
                url,
                headers=hdrs,
                data=data,
                ssl_context=self._ssl_for(host) if same else None,
                proxy=self._proxy(url),
            )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            # Joined as text: a presigned URL's query must go back byte for byte.
            url = urljoin(resp.url, location)
            if resp.status == 303:
                method, data = "GET", None
            log.debug("following redirect", status=resp.status, to=origin(url))
        raise Unavailable(f"{host.host}: more than {MAX_REDIRECTS} redirects")

    async def _send(
        self,
        host: RegistryHost,
        method: str,
        url: str,
        *,
        scope: str,
        what: str,
        headers: dict[str, str] | None = None,
        data: Any = None,
        replayable: bool = True,
    ) -> Response:
        """Send with auth, retries and redirects. Returns the final response, whatever its status,
        except that a 401 after a fresh authorization is PermissionDenied and a network failure
        after the retries is Unavailable."""
        hdrs = {**self._headers, **host.headers, **(headers or {})}
        authorization = await self._auth.header(host.host, scope)
        authorized_again = False
        attempt = 0
        while True:
            try:
                resp = await self._send_following(host, method, url, hdrs, authorization, data)
            except TLSError as e:
                raise Unavailable(f"{what}: {host.host}: tls: {e}") from e
            except (HTTPError, TimeoutError) as e:
                if not replayable or attempt >= self.max_retries:
                    raise Unavailable(
                        f"{what}: {host.scheme}://{host.host}: {str(e) or type(e).__name__}"
                    ) from e
                attempt += 1
                log.debug("retrying after a network error", host=host.host, error=str(e), attempt=attempt)
                await asyncio.sleep(_backoff(attempt))
                continue
            if resp.status == 401 and origin(resp.url) == origin(host.base_url):
                challenges = resp.headers.getall("WWW-Authenticate", [])
                if authorized_again or not replayable or not challenges:
                    body = await _error_body(resp)
                    resp.release()
                    raise errors.for_response(401, resp.reason or "", body, what=what, registry=host.host)
                resp.release()
                authorization = await self._auth.on_unauthorized(
                    host.host, scope, challenges, registry=host.host, sent=authorization
                )
                authorized_again = True
                continue
            if resp.status in errors.RETRYABLE_STATUS and replayable and attempt < self.max_retries:
                attempt += 1
                delay = _retry_after(resp, attempt)
                resp.release()
                log.debug("retrying after a status", host=host.host, status=resp.status, attempt=attempt)
                await asyncio.sleep(delay)
                continue
            return resp

    async def _fail(self, resp: Response, host: RegistryHost, what: str) -> ContainerdError:
        body = await _error_body(resp)
        resp.release()
        return errors.for_response(resp.status, resp.reason or "", body, what=what, registry=host.host)

    async def _fetch_token(self, req: TokenRequest) -> bytes:
        """The token endpoint round trip for the Authorizer (GET or OAuth2 POST)."""
        session = self._get_session()
        url = req.url
        headers = dict(self._headers)
        if req.authorization:
            headers["Authorization"] = req.authorization
        sslctx = self._ssl_by_origin.get(origin(url))
        attempt = 0
        while True:
            try:
                if req.method == "POST":
                    resp = await session.request(
                        "POST",
                        url,
                        data=req.params,
                        headers=headers,
                        ssl_context=sslctx,
                        proxy=self._proxy(url),
                    )
                else:
                    resp = await session.request(
                        "GET",
                        update_query(url, req.params),
                        headers=headers,
                        ssl_context=sslctx,
                        proxy=self._proxy(url),
                    )
                async with resp:
                    body = await resp.read(1 << 20)
                    status, reason = resp.status, resp.reason or ""
            except (HTTPError, TimeoutError) as e:
                if attempt >= self.max_retries:
                    raise Unavailable(
                        f"fetching a token from {origin(url)}: {str(e) or type(e).__name__}"
                    ) from e
                attempt += 1
                await asyncio.sleep(_backoff(attempt))
                continue
            if status == 200:
                return body
            detail = errors.describe(status, reason, body)
            if status in (401, 403):
                raise PermissionDenied(f"unauthorized: token server {host_of(url)} refused: {detail}")
            raise errors.for_response(status, reason, body, what="fetching a token", registry=host_of(url))

    # -------------------------------------------------------------------------------- helpers

    def _url(self, host: RegistryHost, ref: Reference, *parts: str) -> str:
        url = f"{host.base_url}/{ref.path}/{'/'.join(parts)}"
        if _is_proxy(host.host, ref.domain):
            url = update_query(url, {"ns": ref.domain})
        return url

    def _capable(self, ref: Reference, capability: str) -> list[RegistryHost]:
        hosts = [h for h in self.hosts(ref.domain) if capability in h.capabilities]
        if not hosts:
            raise NotFound(f"no {capability} hosts for {ref.domain}")
        return hosts

    @staticmethod
    def _scope(ref: Reference, push: bool = False) -> str:
        return f"repository:{ref.path}:{'pull,push' if push else 'pull'}"

    # -------------------------------------------------------------------------------- resolve

    async def resolve(self, ref: Reference) -> tuple[str, Descriptor]:
        """(name, descriptor of the top object) for ``ref``; NotFound ``<ref>: not found``."""
        first_error: ContainerdError | None = None
        for host in self._capable(ref, "resolve"):
            try:
                desc = await self._resolve_on(host, ref)
            except NotFound:
                log.debug("trying next host: not found", host=host.host, ref=str(ref))
                continue
            except (PermissionDenied, Unavailable, InvalidArgument, FailedPrecondition) as e:
                log.info("trying next host", host=host.host, ref=str(ref), error=str(e))
                first_error = first_error or e
                continue
            return str(ref), desc
        if first_error is not None:
            raise first_error
        raise NotFound(str(ref))

    async def _resolve_on(self, host: RegistryHost, ref: Reference) -> Descriptor:
        url = self._url(host, ref, "manifests", ref.object)
        what = str(ref)
        headers = {"Accept": ACCEPT}
        resp = await self._send(host, "HEAD", url, scope=self._scope(ref), what=what, headers=headers)
        if resp.status >= 300:
            raise await self._fail(resp, host, what)
        resp.release()
        media_type = resp.content_type if "Content-Type" in resp.headers else ""
        _check_not_schema1(media_type, ref)
        dgst = ref.digest or resp.headers.get("Docker-Content-Digest", "")
        size = resp.content_length
        if media_type in MANIFEST_TYPES and dgst and size is not None:
            return Descriptor(media_type, digestmod.validate(dgst), size)
        # The HEAD left something out (some registries omit the digest, or answer a generic
        # content type): read the manifest itself and take what it says.
        resp = await self._send(host, "GET", url, scope=self._scope(ref), what=what, headers=headers)
        try:
            if resp.status >= 300:
                raise await self._fail(resp, host, what)
            if resp.content_length is not None and resp.content_length > MAX_MANIFEST:
                raise ResourceExhausted(f"{what}: manifest of {resp.content_length} bytes is too large")
            body = await resp.read(MAX_MANIFEST + 1)
        except (HTTPError, TimeoutError) as e:
            raise Unavailable(f"{what}: {host.host}: {e}") from e
        finally:
            resp.release()
        if len(body) > MAX_MANIFEST:
            raise ResourceExhausted(f"{what}: manifest larger than {MAX_MANIFEST} bytes")
        if media_type not in MANIFEST_TYPES:
            media_type = media_type_of(body)
            _check_not_schema1(media_type, ref)
        if ref.digest:
            await _verify(body, Descriptor(media_type, ref.digest, -1), what)
        return Descriptor(media_type, ref.digest or await _digest_of(body), len(body))

    # ---------------------------------------------------------------------------------- fetch

    def _object_path(self, desc: Descriptor) -> str:
        kind = (
            "manifests" if desc.media_type in MANIFEST_TYPES or desc.media_type in SCHEMA1_TYPES else "blobs"
        )
        return f"{kind}/{digestmod.validate(desc.digest)}"

    async def fetch_bytes(self, ref: Reference, desc: Descriptor, limit: int = 16 << 20) -> bytes:
        """A small object (manifest, index, config) read whole and checked against ``desc``."""
        if desc.size > limit:
            raise ResourceExhausted(f"{desc.digest}: {desc.size} bytes is more than the limit of {limit}")
        parts = [piece async for piece in self.fetch(ref, desc)]
        data = b"".join(parts)
        await _verify(data, desc, f"{desc.digest} from {ref.name}")
        return data

    async def _open(
        self, ref: Reference, desc: Descriptor, hosts: list[RegistryHost], offset: int
    ) -> tuple[RegistryHost, str, Response]:
        """The first endpoint that has the object, with its response (status 200 or 206)."""
        what = f"{desc.digest} in {ref.name}"
        first_error: ContainerdError | None = None
        for host in hosts:
            url = self._url(host, ref, *self._object_path(desc).split("/"))
            try:
                resp = await self._get_from(host, url, ref, desc, offset)
            except NotFound:
                continue
            except ContainerdError as e:
                log.info("trying next host", host=host.host, what=what, error=str(e))
                first_error = first_error or e
                continue
            return host, url, resp
        if first_error is not None:
            raise first_error
        raise NotFound(what)

    async def _get_from(
        self, host: RegistryHost, url: str, ref: Reference, desc: Descriptor, offset: int
    ) -> Response:
        what = f"{desc.digest} in {ref.name}"
        headers = {"Accept": ", ".join((desc.media_type, "*/*"))} if desc.media_type else {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = await self._send(host, "GET", url, scope=self._scope(ref), what=what, headers=headers)
        if resp.status >= 300:
            raise await self._fail(resp, host, what)
        return resp

    @staticmethod
    def _skip_for(resp: Response, offset: int, size: int, what: str) -> int:
        """How many leading bytes of ``resp`` to drop so that it starts at ``offset``; checks the
        lengths the server announces against the descriptor's size."""
        length = resp.content_length
        if resp.status == 206:
            first = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
            if first != str(offset):
                resp.release()
                raise FailedPrecondition(f"{what}: asked for bytes from {offset}, got range {first!r}")
            expected = size - offset
            skip = 0
        else:
            # A server that ignores Range sends everything; we drop what we already have.
            expected, skip = size, offset
        if size >= 0 and length is not None and length != expected:
            resp.release()
            raise FailedPrecondition(
                f"{what}: size mismatch: server sends {length} bytes, expected {expected}"
            )
        return skip

    async def fetch(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream ``desc`` from ``offset`` in pieces of at least CHUNK bytes (but the last).

        Not verified (the caller hashes as it writes), but never more or fewer bytes than
        ``desc.size``: a dropped connection is resumed with Range. As in containerd, only failures
        that brought no new bytes count against ``max_retries``: a long blob on a flaky link
        still completes, a server that sends nothing more does not keep us forever.
        """
        size = desc.size
        what = f"{desc.digest} in {ref.name}"
        if offset < 0 or (size >= 0 and offset > size):
            raise InvalidArgument(f"{what}: offset {offset} outside 0..{size}")
        if size >= 0 and offset == size:
            return
        host, url, resp = await self._open(ref, desc, self._capable(ref, "pull"), offset)
        pos = offset
        failures = 0
        while True:
            failure: BaseException | None = None
            started_at = pos
            try:
                skip = self._skip_for(resp, pos, size, what)
                parts: list[bytes] = []
                have = 0
                try:
                    async for piece in resp.iter_any():
                        if skip:
                            dropped = min(skip, len(piece))
                            piece, skip = piece[dropped:], skip - dropped
                            if not piece:
                                continue
                        if size >= 0 and pos + have + len(piece) > size:
                            raise FailedPrecondition(
                                f"{what}: size mismatch: server sends more than {size} bytes"
                            )
                        parts.append(piece)
                        have += len(piece)
                        if have >= CHUNK:
                            out = b"".join(parts)
                            parts, have = [], 0
                            pos += len(out)
                            yield out
                except (HTTPError, TimeoutError) as e:
                    failure = e
                if parts:  # what arrived before a break is good: keep it rather than fetch it again
                    out = b"".join(parts)
                    pos += len(out)
                    yield out
            finally:
                resp.release()
            if size < 0 and failure is None:
                return
            if pos == size:
                return
            failures = 0 if pos > started_at else failures + 1
            reason = (
                (str(failure) or type(failure).__name__) if failure is not None else "connection closed early"
            )
            if failures > self.max_retries:
                raise Unavailable(
                    f"{what}: {host.host}: {reason} at byte {pos} of {size}, "
                    f"{self.max_retries} retries without progress"
                )
            log.info("resuming fetch", what=what, host=host.host, offset=pos, error=reason, attempt=failures)
            await asyncio.sleep(_backoff(max(failures, 1)))
            resp = await self._get_from(host, url, ref, desc, pos)

    # ----------------------------------------------------------------------------------- push

    async def push_blob(self, ref: Reference, desc: Descriptor, data: AsyncIterator[bytes] | bytes) -> bool:
        """Upload a blob unless the repository has it already (monolithic, streamed PUT).

        False when the registry had it (``data`` is then never read), True once uploaded."""
        host = self._capable(ref, "push")[0]
        scope = self._scope(ref, push=True)
        what = f"blob {desc.digest} to {ref.name}"
        resp = await self._send(
            host, "HEAD", self._url(host, ref, "blobs", desc.digest), scope=scope, what=what
        )
        if resp.status == 200:
            resp.release()
            return False
        if resp.status != 404:
            raise await self._fail(resp, host, what)
        resp.release()
        if isinstance(data, bytes | bytearray | memoryview):
            data = bytes(data)
            await _verify(data, desc, what)
        resp = await self._send(
            host,
            "POST",
            self._url(host, ref, "blobs", "uploads", ""),
            scope=scope,
            what=what,
            headers={"Content-Length": "0"},
        )
        if resp.status == 201:  # the registry mounted it from elsewhere
            resp.release()
            return False
        location = resp.headers.get("Location")
        if resp.status != 202 or not location:
            raise await self._fail(resp, host, what)
        resp.release()
        # The upload URL may carry state in its query (_state=…): the digest is added to it.
        put_url = extend_query(urljoin(resp.url, location), {"digest": desc.digest})
        headers = {"Content-Type": "application/octet-stream"}
        body: Any
        counting: _CountingBody | None = None
        if isinstance(data, bytes):
            body = data
        else:
            counting = _CountingBody(data, desc.size, what)
            body = counting.stream()
            if desc.size >= 0:
                headers["Content-Length"] = str(desc.size)
        try:
            resp = await self._send(
                host,
                "PUT",
                put_url,
                scope=scope,
                what=what,
                headers=headers,
                data=body,
                replayable=counting is None,
            )
        except Unavailable:
            if counting is not None and counting.error is not None:
                raise counting.error from None
            raise
        if resp.status not in (201, 204):
            raise await self._fail(resp, host, what)
        resp.release()
        return True

    async def push_manifest(self, ref: Reference, desc: Descriptor, data: bytes) -> bool:
        """PUT a manifest or index under ``ref.tag``, or under its digest when ref has no tag.

        False when the registry has it there already: by digest, or a tag that names this very
        digest (a tag naming another one is moved); True once uploaded."""
        what = f"manifest {desc.digest} to {ref.name}"
        await _verify(data, desc, what)
        host = self._capable(ref, "push")[0]
        scope = self._scope(ref, push=True)
        url = self._url(host, ref, "manifests", ref.tag or desc.digest)
        accept = {"Accept": ", ".join((desc.media_type, "*/*"))}
        resp = await self._send(host, "HEAD", url, scope=scope, what=what, headers=accept)
        if resp.status not in (200, 404):
            raise await self._fail(resp, host, what)
        resp.release()
        if resp.status == 200 and (not ref.tag or resp.headers.get("Docker-Content-Digest") == desc.digest):
            return False
        resp = await self._send(
            host,
            "PUT",
            url,
            scope=scope,
            what=what,
            headers={"Content-Type": desc.media_type},
            data=data,
        )
        if resp.status not in (200, 201, 202, 204):
            raise await self._fail(resp, host, what)
        resp.release()
        return True
