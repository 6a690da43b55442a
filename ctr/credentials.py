"""Registry credentials on the client side: ``--user`` and Docker's ``config.json``.

The daemon pulls and pushes, but the credentials are the user's: it asks for them per registry
host on the transfer's auth stream (the protocol is in pyctr.daemon.transfer.streams), and pyctr
answers from here, in this order:

    --user user[:password]   for every host the transfer talks to, as ctr's ``--user``; without
                             a password, it is asked for on the terminal (no echo)
    config.json              ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``:
                             ``credHelpers`` for the host, then ``credsStore``, then ``auths``
                             (``auth`` = base64 of user:password, or ``username`` and
                             ``password``, or an ``identitytoken``)

A host's key in ``auths`` may be spelt ``127.0.0.1:5000``, ``https://127.0.0.1:5000/v1/`` and so
on; Docker Hub's ``https://index.docker.io/v1/`` also answers for docker.io and
registry-1.docker.io. Secrets never reach a log line or an error message.
"""

from __future__ import annotations

import os
import sys

from pyctr.api.errdefs import InvalidArgument

# What only a prompt, a config file or a helper needs (json, getpass, subprocess, urllib, the
# config.json codec) is imported there: most pulls have none of them, and pull's start-up counts.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_KEY = "https://index.docker.io/v1/"  # what Docker calls Docker Hub in config.json


class Credentials:
    """A user name and secret; a plain class, not a dataclass (importing dataclasses costs more
    than a pull's whole client-side work)."""

    __slots__ = ("secret", "username")

    def __init__(self, username: str, secret: str) -> None:
        self.username = username  # "" with a secret: the secret is an identity (refresh) token
        self.secret = secret

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self.username, self.secret) == (other.username, other.secret)

    def __hash__(self) -> int:
        return hash((self.username, self.secret))

    def __repr__(self) -> str:  # keep secrets out of tracebacks
        return f"Credentials(username={self.username!r}, secret=***)"


def parse_user(value: str) -> tuple[str, str | None]:
    """``user:password`` -> (user, password); ``user`` or ``user:`` -> (user, None), as ctr reads it."""
    user, sep, password = value.partition(":")
    if not user:
        raise InvalidArgument("--user: the user name is empty")
    return user, (password if sep and password else None)


def prompt_password(user: str) -> str:
    """The password for ``user`` from the terminal, without echo, as ctr asks for it."""
    if not sys.stdin.isatty():
        raise InvalidArgument(
            f"--user {user}: no password given and stdin is not a terminal to ask on "
            "(use --user user:password)"
        )
    import getpass

    return getpass.getpass("Password: ")


def config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _key_host(key: str) -> str:
    """A config.json key ("https://host/v1/", "host", "http://host:5000") as a bare host."""
    if "://" in key:
        from urllib.parse import urlsplit

        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def _same_registry(a: str, b: str) -> bool:
    return a == b or (a in DOCKER_HUB_ALIASES and b in DOCKER_HUB_ALIASES)


def _auth_entry(key: str, entry: dict[str, Any]) -> Credentials | None:
    from pyctr.api import dockerconfig

    try:
        found = dockerconfig.decode_auth_entry(entry)
    except ValueError as e:
        raise InvalidArgument(f"docker config: auths[{key!r}]: {e}") from None
    return Credentials(*found) if found else None


def _run_helper(helper: str, server: str) -> Credentials | None:
    """``docker-credential-<helper> get``; a missing or broken helper stops pyctr with its reason."""
    import subprocess

    from pyctr.api import dockerconfig

    try:
        found = dockerconfig.helper_get(helper, server)
    except FileNotFoundError as e:
        raise InvalidArgument(f"docker config: {e}") from None
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    except (OSError, subprocess.SubprocessError) as e:
        raise InvalidArgument(f"docker-credential-{helper}: {e}") from None
    return Credentials(*found) if found else None


class DockerConfig:
    """A parsed config.json (read once per command); ``lookup`` may run a credential helper."""

    def __init__(self, doc: dict[str, Any], path: str) -> None:
        self.doc = doc
        self.path = path

    @classmethod
    def load(cls, path: str | None = None) -> DockerConfig | None:
        """The config file, or None when there is none; InvalidArgument when it is not JSON."""
        path = path or config_path()
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        import json

        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"docker config {path}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidArgument(f"docker config {path}: not a JSON object")
        return cls(doc, path)

    def lookup(self, host: str) -> Credentials | None:
        """Credentials for a registry ``host[:port]`` (blocking: a helper is a program)."""
        server = DOCKER_HUB_KEY if host in DOCKER_HUB_ALIASES else host
        for key, helper in (self.doc.get("credHelpers") or {}).items():
            if _same_registry(_key_host(key), host):
                return _run_helper(str(helper), server)
        if self.doc.get("credsStore"):
            found = _run_helper(str(self.doc["credsStore"]), server)
            if found is not None:
                return found
        auths = self.doc.get("auths") or {}
        if isinstance(auths.get(host), dict):  # the exact key first, then any spelling of it
            return _auth_entry(host, auths[host])
        for key, entry in auths.items():
            if isinstance(entry, dict) and _same_registry(_key_host(key), host):
                return _auth_entry(key, entry)
        return None


class CredentialSource:
    """What pyctr answers the daemon with: ``--user`` for every host, else the Docker config."""

    def __init__(self, user: Credentials | None, config: DockerConfig | None) -> None:
        self.user = user
        self.config = config

    @classmethod
    def from_args(cls, user: str) -> CredentialSource:
        """From ``--user`` (prompting for a missing password) and the Docker config file."""
        if user:
            name, password = parse_user(user)
            if password is None:
                password = prompt_password(name)
            return cls(Credentials(name, password), None)
        return cls(None, DockerConfig.load())

    @property
    def empty(self) -> bool:
        """Nothing to offer: no need for an auth stream at all."""
        return self.user is None and self.config is None

    def lookup(self, host: str) -> Credentials | None:
        if self.user is not None:
            return self.user
        return self.config.lookup(host) if self.config is not None else None
