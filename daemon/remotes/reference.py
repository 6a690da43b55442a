"""Image references: the docker/distribution grammar and docker's normalisation.

Grammar (distribution/reference, the version containerd 2.x vendors, which accepts IPv6 hosts)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] component ( "/" component )*
    domain     := ( dns-name | "[" ipv6 "]" ) [ ":" port ]
    component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex          (sha256, sha384 or sha512, checked for length)

Normalisation (``ParseDockerRef``-like, but keeping both tag and digest when both are given):
the first path element is a domain only if it contains ``.`` or ``:``, is ``localhost``, or has
an uppercase letter; otherwise the domain is ``docker.io``. ``index.docker.io`` is an alias of
``docker.io``. A one-component path on docker.io gets ``library/``. No tag and no digest means
``:latest``. The whole name (domain included) may not exceed 255 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from pyctr.api import digest as digestmod
from pyctr.api.errdefs import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
# re.ASCII: Go's \w is ASCII-only, Python's is Unicode by default.
_REFERENCE = re.compile(rf"^(?:({_DOMAIN})/)?({_REMOTE_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$", re.ASCII)
_IDENTIFIER = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    """A normalised reference. ``tag`` is "" when only a digest was given."""

    domain: str
    path: str
    tag: str
    digest: str

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What ``/manifests/<object>`` names: the digest when there is one (it is exact)."""
        return self.digest or self.tag

    def with_tag(self, tag: str) -> Reference:
        return replace(self, tag=tag)

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to ``digest`` and without a tag."""
        return replace(self, tag="", digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def _split_docker_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep:
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + name
    if first == LEGACY_DEFAULT_DOMAIN:
        domain, remainder = DEFAULT_DOMAIN, rest
    elif first == "localhost" or any(c in first for c in ".:") or first.lower() != first:
        domain, remainder = first, rest
    else:
        return DEFAULT_DOMAIN, name
    if domain == DEFAULT_DOMAIN and "/" not in remainder:  # a tag or digest never holds a "/"
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse(ref: str) -> Reference:
    """Parse and normalise ``ref``; InvalidArgument says what is wrong with a bad one."""
    if not ref:
        raise InvalidArgument("invalid reference format: repository name must have at least one component")
    if _IDENTIFIER.match(ref):
        raise InvalidArgument(f"invalid repository name ({ref}), cannot specify 64-byte hexadecimal strings")
    domain, remainder = _split_docker_domain(ref)
    remote = remainder.split("@", 1)[0].split(":", 1)[0]
    if remote.lower() != remote:
        raise InvalidArgument(f"invalid reference format: repository name ({remote}) must be lowercase")
    m = _REFERENCE.match(f"{domain}/{remainder}")
    # The domain group can come out empty when the domain is malformed ("a.b_c/d" still matches
    # as a bare path): that is a bad domain, not a docker.io name.
    if m is None or m.group(1) != domain:
        raise InvalidArgument(f"invalid reference format: {ref!r}")
    path, tag, digest = m.group(2), m.group(3) or "", m.group(4) or ""
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(
            f"invalid reference format: repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    if digest:
        digestmod.validate(digest)  # a registered algorithm with the right length, as go-digest checks
    elif not tag:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)
