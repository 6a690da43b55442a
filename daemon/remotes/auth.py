"""Registry credentials and the authorization flow.

Flow, per request (``Authorizer`` keeps the state; ``registry.RegistryClient`` drives it):

1. The first request to a host goes out anonymously.
2. A 401 carries ``WWW-Authenticate``. ``Basic`` -> the credentials for the host are sent as
   ``Authorization: Basic`` from then on (no credentials -> PermissionDenied); credentials that
   carry a ready ``header`` are sent as they are, for either scheme. ``Bearer realm=..,
   service=.., scope=..`` -> a token is fetched from the realm for the union of the challenge's
   scope and the request's own (``repository:<path>:pull`` or ``pull,push``):
     * credentials with a username: ``GET realm?service=..&scope=..`` with Basic credentials;
     * an identity token (username ""): ``POST realm`` form ``grant_type=refresh_token`` (OAuth2);
     * no credentials: the same GET, anonymously (public images on Docker Hub).
3. The request is sent once more with the new header. A second 401 is final:
   PermissionDenied ``unauthorized: ...`` naming the registry.
4. Tokens are cached per (host, scope) until 90% of ``expires_in`` (at least 60 s, as the token
   spec says) has passed; later requests with that scope send the cached token up front and skip
   the 401 round trip. A host's challenge is remembered too, so a request with a new scope
   fetches its token (for that scope alone) before it is sent, and a Basic host gets the header
   that last worked. A token or Basic header that draws a 401 is fetched anew once.

The ``host`` everywhere is the endpoint's ``host[:port]`` (a mirror's, or registry-1.docker.io),
which is also what a ``CredentialsFunc`` (host -> Credentials) is asked about; docker.io's
aliases match each other. ``docker_config_func`` builds one from a Docker ``config.json``
(``credHelpers``, then ``credsStore``, then ``auths``). Credentials are per client: one
``RegistryClient`` per set of credentials, so cached tokens never cross users.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pyctr.api import dockerconfig
from pyctr.api.errdefs import InvalidArgument, PermissionDenied
from pyctr.api.log import get_logger

log = get_logger("pyctrd.remotes")

DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# What Docker calls Docker Hub in config.json and passes to credential helpers.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
MAX_CACHED_TOKENS = 256  # past this, expired tokens are dropped when a new one is stored
MIN_TOKEN_LIFETIME = 60  # seconds; the token spec's default when expires_in is absent or lower


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str  # a password, or an identity (refresh) token when username is ""
    # A ready Authorization value (containerd's AuthType HEADER): sent as it is, whatever the
    # registry's challenge, instead of anything built from username and secret.
    header: str = ""

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"Credentials(username={self.username!r}, secret=***{', header=***' if self.header else ''})"


CredentialsFunc = Callable[[str], Awaitable[Credentials | None]]


# ------------------------------------------------------------------------------ docker config


def _config_path(path: str | None) -> str:
    if path is None:
        base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
        return os.path.join(base, "config.json")
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def _key_host(key: str) -> str:
    """A config.json key ("https://host/v1/", "host", "http://host:5000") as a bare host."""
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def _same_registry(a: str, b: str) -> bool:
    return a == b or (a in DOCKER_HUB_ALIASES and b in DOCKER_HUB_ALIASES)


def _decode_auth_entry(entry: dict[str, Any]) -> Credentials | None:
    try:
        found = dockerconfig.decode_auth_entry(entry)
    except ValueError as e:
        raise InvalidArgument(f"docker config: invalid auth entry: {e}") from e
    return Credentials(*found) if found else None


def _run_helper(helper: str, server: str) -> Credentials | None:
    """``docker-credential-<helper> get``; a missing helper is logged and means no credentials."""
    try:
        found = dockerconfig.helper_get(helper, server, timeout=30)
    except FileNotFoundError:
        log.warning("credential helper not installed", helper=f"docker-credential-{helper}")
        return None
    except ValueError as e:
        raise InvalidArgument(str(e)) from e
    if found is None:
        log.debug("credential helper found nothing", helper=helper, server=server)
    return Credentials(*found) if found else None


def docker_config_credentials(domain: str, path: str | None = None) -> Credentials | None:
    """Credentials for ``domain`` from a Docker config file (blocking: run it in a thread).

    ``path`` is the config file or its directory; by default ``$DOCKER_CONFIG/config.json`` or
    ``~/.docker/config.json``. A missing file means no credentials.
    """
    try:
        with open(_config_path(path)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise InvalidArgument(f"docker config {_config_path(path)}: {e}") from e
    if not isinstance(doc, dict):
        return None
    hub = domain in DOCKER_HUB_ALIASES
    server = DOCKER_HUB_KEY if hub else domain
    helpers = doc.get("credHelpers") or {}
    for key, helper in helpers.items():
        if _same_registry(_key_host(key), domain):
            return _run_helper(str(helper), server)
    if doc.get("credsStore"):
        found = _run_helper(str(doc["credsStore"]), server)
        if found is not None:
            return found
    auths = doc.get("auths") or {}
    # An exact key first ("127.0.0.1:5000"), then any spelling of the same host.
    if isinstance(auths.get(domain), dict):
        return _decode_auth_entry(auths[domain])
    for key, entry in auths.items():
        if isinstance(entry, dict) and _same_registry(_key_host(key), domain):
            return _decode_auth_entry(entry)
    return None


def docker_config_func(path: str | None = None) -> CredentialsFunc:
    """A CredentialsFunc reading a Docker config file on each call, off the event loop."""

    async def credentials(host: str) -> Credentials | None:
        return await asyncio.to_thread(docker_config_credentials, host, path)

    return credentials


def static_credentials(mapping: dict[str, Credentials]) -> CredentialsFunc:
    """A CredentialsFunc from a fixed host -> Credentials table (docker.io aliases match)."""

    async def credentials(host: str) -> Credentials | None:
        for key, creds in mapping.items():
            if _same_registry(key, host):
                return creds
        return None

    return credentials


# --------------------------------------------------------------------------- WWW-Authenticate


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer"
    params: dict[str, str] = field(default_factory=dict)


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _token(s: str, i: int) -> tuple[str, int]:
    j = i
    while j < len(s) and s[j] in _TOKEN_CHARS:
        j += 1
    return s[i:j], j


def _skip(s: str, i: int, chars: str = " \t") -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _quoted(s: str, i: int) -> tuple[str, int]:
    out = []
    i += 1  # the opening quote
    while i < len(s) and s[i] != '"':
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        out.append(s[i])
        i += 1
    return "".join(out), i + 1


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """Challenges of RFC 7235 headers: ``Bearer realm="..",scope="a b"``, ``Basic realm=..``."""
    out: list[Challenge] = []
    for s in values:
        i = 0
        while True:
            i = _skip(s, i, " \t,")
            scheme, i = _token(s, i)
            if not scheme:
                break
            params: dict[str, str] = {}
            while True:
                i = _skip(s, i, " \t,")
                name, j = _token(s, i)
                k = _skip(s, j)
                if not name or k >= len(s) or s[k] != "=":
                    break  # not a parameter: the start of the next challenge (or the end)
                k = _skip(s, k + 1)
                if k < len(s) and s[k] == '"':
                    value, i = _quoted(s, k)
                else:
                    # Leniently up to "," or a space: some servers leave URLs unquoted.
                    i = k
                    while i < len(s) and s[i] not in ", \t":
                        i += 1
                    value = s[k:i]
                params[name.lower()] = value
            out.append(Challenge(scheme.lower(), params))
            if i >= len(s):
                break
    return out


def merge_scopes(*scopes: str) -> str:
    """Space-separated scopes with the actions of one resource merged, in a stable order:
    ``repository:a:pull`` and ``repository:a:push`` -> ``repository:a:pull,push``."""
    actions: dict[str, set[str]] = {}
    for group in scopes:
        for s in group.split():
            resource, sep, acts = s.rpartition(":")
            if not sep or ":" not in resource:  # not type:name:actions; kept as it is
                actions.setdefault(s, set())
                continue
            actions.setdefault(resource, set()).update(a for a in acts.split(",") if a)
    return " ".join(f"{r}:{','.join(sorted(a))}" if a else r for r, a in sorted(actions.items()))


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.secret}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# ----------------------------------------------------------------------------------- tokens


@dataclass
class _Token:
    value: str
    expires_at: float  # time.monotonic()


@dataclass
class TokenRequest:
    """What the client has to send to get a token (the IO stays in the client)."""

    method: str  # "GET" | "POST"
    url: str
    params: dict[str, str]  # query for GET, form for POST
    authorization: str | None


def token_request(challenge: Challenge, scope: str, creds: Credentials | None) -> TokenRequest:
    realm = challenge.params.get("realm", "")
    if not realm.startswith(("http://", "https://")):
        raise PermissionDenied(f"unauthorized: bearer challenge without a usable realm ({realm!r})")
    service = challenge.params.get("service", "")
    if creds is not None and not creds.username and creds.secret:
        form = {"grant_type": "refresh_token", "refresh_token": creds.secret, "client_id": "pyctr"}
        if service:
            form["service"] = service
        if scope:
            form["scope"] = scope
        return TokenRequest("POST", realm, form, None)
    query = {"service": service} if service else {}
    if scope:
        query["scope"] = scope
    auth = basic_header(creds) if creds is not None and creds.username else None
    return TokenRequest("GET", realm, query, auth)


def parse_token_response(body: bytes) -> tuple[str, float]:
    """(token, lifetime in seconds) from a token endpoint's JSON answer."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise PermissionDenied(f"unauthorized: token endpoint sent invalid JSON: {e}") from e
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not token:
        raise PermissionDenied("unauthorized: token endpoint sent no token")
    try:
        lifetime = float(doc.get("expires_in") or MIN_TOKEN_LIFETIME)
    except (TypeError, ValueError):
        lifetime = MIN_TOKEN_LIFETIME
    return str(token), max(lifetime, MIN_TOKEN_LIFETIME)


TokenFetcher = Callable[[TokenRequest], Awaitable[bytes]]


class Authorizer:
    """Per-host challenges and per-(host, scope) tokens; one token fetch per key at a time."""

    def __init__(self, credentials: CredentialsFunc | None, fetch_token: TokenFetcher) -> None:
        self._credentials = credentials
        self._fetch_token = fetch_token
        self._challenges: dict[str, Challenge] = {}
        # The Basic header that last worked per host: asking the CredentialsFunc (maybe a file
        # read in a thread, maybe a helper program) on every request would cost more than it.
        self._basic: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.token_fetches = 0  # observable for tests and debug logs

    async def _creds(self, host: str) -> Credentials | None:
        return await self._credentials(host) if self._credentials is not None else None

    async def header(self, host: str, scope: str) -> str | None:
        """The Authorization value to send up front, from what earlier 401s taught us."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic.get(host)
        # The scope a past challenge named was about another request: only ours is asked for.
        return await self._bearer(host, scope, challenge, challenge_scope="")

    async def on_unauthorized(
        self, host: str, scope: str, www_authenticate: list[str], registry: str, sent: str | None
    ) -> str:
        """Learn from a 401 (to a request that carried ``sent``) and return the value to retry with."""
        challenges = parse_www_authenticate(www_authenticate)
        by_scheme = {c.scheme: c for c in challenges}
        # Bearer first: a registry that offers both prefers tokens (Docker's client does the same).
        challenge = by_scheme.get("bearer") or by_scheme.get("basic")
        if challenge is None:
            raise PermissionDenied(f"unauthorized: {registry}: no supported authentication challenge")
        self._challenges[host] = challenge
        if challenge.scheme == "basic":
            creds = await self._creds(host)
            if creds is not None and creds.header:
                self._basic[host] = creds.header
            elif creds is None or not creds.username:
                raise PermissionDenied(f"unauthorized: {registry} requires credentials (basic auth)")
            else:
                self._basic[host] = basic_header(creds)
            return self._basic[host]
        value = await self._bearer(
            host, scope, challenge, challenge_scope=challenge.params.get("scope", ""), refused=sent
        )
        assert value is not None
        return value

    async def _bearer(
        self, host: str, scope: str, challenge: Challenge, *, challenge_scope: str, refused: str | None = None
    ) -> str | None:
        key = (host, scope)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            now = time.monotonic()
            # A token the server just refused is dropped; one that another task fetched while we
            # waited for the lock is newer than what was refused, so it is used as it is.
            if cached is not None and cached.expires_at > now and "Bearer " + cached.value != refused:
                return "Bearer " + cached.value
            creds = await self._creds(host)
            if creds is not None and creds.header:
                return creds.header  # the caller's own token: nothing to fetch or cache
            want = merge_scopes(scope, challenge_scope)
            req = token_request(challenge, want, creds)
            self.token_fetches += 1
            token, lifetime = parse_token_response(await self._fetch_token(req))
            # Renewed at 90% of its life, so it does not expire between our check and its use.
            self._tokens[key] = _Token(token, now + lifetime * 0.9)
            if len(self._tokens) > MAX_CACHED_TOKENS:
                self._prune(now)
            return "Bearer " + token

    def _prune(self, now: float) -> None:
        """Forget expired tokens (a long-lived client meets many repositories)."""
        for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[key]
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
