"""The registry client's sans-IO parts: references, hosts.toml, docker config credentials,
WWW-Authenticate challenges and registry error bodies."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import pytest

from pyctr.api import errdefs
from pyctr.daemon.remotes import auth, errors, hosts, reference, registry
from pyctr.daemon.remotes.auth import Challenge, Credentials
from pyctr.daemon.remotes.hosts import RegistryHost

D = "sha256:" + "a" * 64

# ------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("given", "domain", "path", "tag", "digest", "full"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", "", "docker.io/library/busybox:latest"),
        ("library/busybox", "docker.io", "library/busybox", "latest", "", "docker.io/library/busybox:latest"),
        (
            "docker.io/busybox",
            "docker.io",
            "library/busybox",
            "latest",
            "",
            "docker.io/library/busybox:latest",
        ),
        (
            "index.docker.io/busybox",
            "docker.io",
            "library/busybox",
            "latest",
            "",
            "docker.io/library/busybox:latest",
        ),
        ("docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", "", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", "", "docker.io/library/busybox:1.36"),
        (f"busybox@{D}", "docker.io", "library/busybox", "", D, f"docker.io/library/busybox@{D}"),
        (
            f"busybox:1.36@{D}",
            "docker.io",
            "library/busybox",
            "1.36",
            D,
            f"docker.io/library/busybox:1.36@{D}",
        ),
        ("myuser/my-app", "docker.io", "myuser/my-app", "latest", "", "docker.io/myuser/my-app:latest"),
        ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", "", "localhost:5000/a/b:c"),
        ("localhost/x", "localhost", "x", "latest", "", "localhost/x:latest"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", "", "127.0.0.1:5000/x:latest"),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", "", "[::1]:5000/x:latest"),
        ("[2001:db8::1]/x/y:v1", "[2001:db8::1]", "x/y", "v1", "", None),
        ("ghcr.io/owner/repo:v1.2.3_rc-1", "ghcr.io", "owner/repo", "v1.2.3_rc-1", "", None),
        ("example.com/a__b/c--d.e_f", "example.com", "a__b/c--d.e_f", "latest", "", None),
        ("Registry/x", "Registry", "x", "latest", "", None),  # an uppercase first element is a domain
        ("busybox:" + "T" * 128, "docker.io", "library/busybox", "T" * 128, "", None),
    ],
)
def test_normalisation(given: str, domain: str, path: str, tag: str, digest: str, full: str | None) -> None:
    ref = reference.parse(given)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert str(ref) == (
        full or f"{domain}/{path}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    )
    assert ref.name == f"{domain}/{path}"
    assert reference.parse(str(ref)) == ref  # the normalised form is a fixed point


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Busybox",  # uppercase repository
        "docker.io/Library/busybox",
        "busybox:",
        "busybox:-x",  # a tag starts with a word character
        "busybox:a!b",
        "busybox:" + "t" * 129,
        "busybox@sha256:abc",  # short digest
        "busybox@sha256:" + "A" * 64,  # digests are lower-case hex
        "busybox@md5:" + "a" * 32,  # not a registered algorithm
        "busybox@" + "a" * 64,
        "a" * 64,  # looks like an image ID
        "a..b",
        "-a",
        "a/-b",
        "a/b/",
        "a.b_c/d",  # a domain cannot hold "_"
        "localhost:port/x",
        "[::1/x",
        "example.com/" + "a" * 250,  # over 255 characters with the domain
        "busybox latest",
    ],
)
def test_invalid_references(bad: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        reference.parse(bad)


def test_reference_helpers() -> None:
    ref = reference.parse("127.0.0.1:5000/x:v1")
    assert ref.object == "v1"
    pinned = ref.with_digest(D)
    assert str(pinned) == f"127.0.0.1:5000/x@{D}" and pinned.object == D
    assert str(pinned.with_tag("v2")) == f"127.0.0.1:5000/x:v2@{D}"


# ------------------------------------------------------------------------------ hosts.toml


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_default_hosts() -> None:
    assert hosts.hosts_for("docker.io") == [RegistryHost("registry-1.docker.io", "https")]
    assert hosts.hosts_for("ghcr.io") == [RegistryHost("ghcr.io", "https")]
    assert hosts.hosts_for("ghcr.io", plain_http=True)[0].scheme == "http"
    for local in ("localhost:5000", "localhost", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"):
        (h,) = hosts.hosts_for(local)
        assert (h.host, h.scheme, h.path, h.skip_verify) == (local, "http", "/v2", True), local
        assert h.base_url == f"http://{local}/v2"
    assert not hosts.is_localhost("10.0.0.1:5000") and not hosts.is_localhost("localhost.example.com")


def test_hosts_toml_mirrors_in_file_order(tmp_path: Path) -> None:
    d = tmp_path / "example.com"
    _write(
        d / "hosts.toml",
        """
server = "https://example.com"
ca = "server-ca.crt"

[host."https://zz-mirror.example.net"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/ssl/a.crt", "b.crt"]
  client = [["c.cert", "c.key"]]
  header = { "x-one" = "1", "x-two" = ["a", "b"] }

[host."http://aa-mirror.local:5000/some/path"]
  capabilities = ["PULL"]
  skip_verify = true

[host."mirror-no-scheme.example.org"]
  override_path = true
""",
    )
    got = hosts.hosts_for("example.com", config_dir=str(tmp_path))
    assert [(h.scheme, h.host, h.path) for h in got] == [
        ("https", "zz-mirror.example.net", "/v2"),
        ("http", "aa-mirror.local:5000", "/some/path/v2"),
        ("https", "mirror-no-scheme.example.org", ""),
        ("https", "example.com", "/v2"),
    ]
    first, second, third, server = got
    assert first.capabilities == {"pull", "resolve"}
    assert first.ca_files == ("/etc/ssl/a.crt", str(d / "b.crt"))
    assert first.client_cert == (str(d / "c.cert"), str(d / "c.key"))
    assert first.headers == {"x-one": "1", "x-two": "a, b"}
    assert not first.skip_verify
    assert second.capabilities == {"pull"} and second.skip_verify
    assert third.capabilities == registry_caps()
    assert server.ca_files == (str(d / "server-ca.crt"),) and server.capabilities == registry_caps()


def registry_caps() -> frozenset[str]:
    return frozenset({"pull", "resolve", "push"})


def test_hosts_toml_without_server_ends_with_the_default(tmp_path: Path) -> None:
    _write(
        tmp_path / "docker.io" / "hosts.toml",
        '[host."https://mirror.example.com"]\ncapabilities = ["pull"]\n',
    )
    got = hosts.hosts_for("docker.io", config_dir=str(tmp_path))
    assert [h.host for h in got] == ["mirror.example.com", "registry-1.docker.io"]
    # A localhost server keeps plain http (and skip_verify) when hosts.toml does not say otherwise.
    _write(tmp_path / "localhost_5000_" / "hosts.toml", 'header = { "x-a" = "b" }\n')
    (local,) = hosts.hosts_for("localhost:5000", config_dir=str(tmp_path))
    assert (local.scheme, local.host, local.skip_verify, local.headers) == (
        "http",
        "localhost:5000",
        True,
        {"x-a": "b"},
    )


def test_host_directory_precedence(tmp_path: Path) -> None:
    _write(tmp_path / "_default" / "hosts.toml", 'server = "https://default.example"\n')
    _write(tmp_path / "reg.example:5000" / "hosts.toml", 'server = "https://colon.example"\n')
    assert hosts.hosts_for("reg.example:5000", config_dir=str(tmp_path))[0].host == "colon.example"
    _write(tmp_path / "reg.example_5000_" / "hosts.toml", 'server = "https://underscore.example"\n')
    assert hosts.hosts_for("reg.example:5000", config_dir=str(tmp_path))[0].host == "underscore.example"
    assert hosts.hosts_for("other.example", config_dir=str(tmp_path))[0].host == "default.example"
    # Only one directory is read: the domain's own wins over _default entirely.
    assert len(hosts.hosts_for("reg.example:5000", config_dir=str(tmp_path))) == 1


def test_certs_directory_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "secure.example"
    for name in ("ca.crt", "client.cert", "client.key", "notes.txt"):
        _write(d / name, "x")
    (h,) = hosts.hosts_for("secure.example", config_dir=str(tmp_path))
    assert (h.scheme, h.host) == ("https", "secure.example")
    assert h.ca_files == (str(d / "ca.crt"),)
    assert h.client_cert == (str(d / "client.cert"), str(d / "client.key"))


def test_bad_hosts_toml_falls_back_to_cert_files(tmp_path: Path) -> None:
    d = tmp_path / "bad.example"
    _write(d / "hosts.toml", '[host."https://m"]\ncapabilities = ["fly"]\n')
    _write(d / "ca.crt", "x")
    with pytest.raises(errdefs.InvalidArgument, match="unknown capability"):
        hosts.parse_hosts_toml((d / "hosts.toml").read_text(), str(d))
    (h,) = hosts.hosts_for("bad.example", config_dir=str(tmp_path))
    assert h.host == "bad.example" and h.ca_files == (str(d / "ca.crt"),)
    with pytest.raises(errdefs.InvalidArgument):
        hosts.parse_hosts_toml("server = [", str(d))


# ------------------------------------------------------------------------ docker config.json


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture
def docker_config(tmp_path: Path) -> Path:
    cfg = {
        "auths": {
            "127.0.0.1:5000": {"auth": _b64("local:pa:ss")},
            "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpass")},
            "https://ghcr.io": {"identitytoken": "refresh-123", "auth": _b64("ignored:x")},
            "quay.io": {"username": "q", "password": "qp"},
        }
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_docker_config_lookup(docker_config: Path) -> None:
    p = str(docker_config)
    assert auth.docker_config_credentials("127.0.0.1:5000", p) == Credentials("local", "pa:ss")
    for hub in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert auth.docker_config_credentials(hub, p) == Credentials("hubuser", "hubpass")
    assert auth.docker_config_credentials("ghcr.io", p) == Credentials("", "refresh-123")
    assert auth.docker_config_credentials("quay.io", p) == Credentials("q", "qp")
    assert auth.docker_config_credentials("127.0.0.1:5001", p) is None
    # The directory works as well as the file; a missing file means no credentials.
    assert auth.docker_config_credentials("quay.io", str(docker_config.parent)) == Credentials("q", "qp")
    assert auth.docker_config_credentials("quay.io", str(docker_config.parent / "none.json")) is None
    assert "hubpass" not in repr(auth.docker_config_credentials("docker.io", p))


def test_docker_config_env_and_credential_helper(
    docker_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config.parent))
    assert auth.docker_config_credentials("quay.io") == Credentials("q", "qp")
    # A real helper program on PATH, speaking Docker's protocol: server URL in, JSON out.
    bindir = tmp_path / "bin"
    helper = _write(
        bindir / "docker-credential-pyctrtest",
        '#!/bin/sh\nread server\nprintf \'{"ServerURL":"%s","Username":"helper","Secret":"%s"}\' "$server" "$server"\n',
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    doc = json.loads(docker_config.read_text())
    doc["credHelpers"] = {"docker.io": "pyctrtest", "missing.example": "nonexistent"}
    docker_config.write_text(json.dumps(doc))
    got = auth.docker_config_credentials("registry-1.docker.io")
    assert got == Credentials("helper", "https://index.docker.io/v1/")
    assert auth.docker_config_credentials("missing.example") is None  # helper not installed
    assert auth.docker_config_credentials("quay.io") == Credentials("q", "qp")  # no helper for it


# ----------------------------------------------------------------------- WWW-Authenticate


def test_parse_challenges() -> None:
    hub = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert auth.parse_www_authenticate([hub]) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull",
            },
        )
    ]
    both = 'Basic realm="Registry Realm", Bearer realm=https://t.example/token, scope="a:b:pull c:d:push",x="q\\"uo,te"'
    assert auth.parse_www_authenticate([both]) == [
        Challenge("basic", {"realm": "Registry Realm"}),
        Challenge(
            "bearer", {"realm": "https://t.example/token", "scope": "a:b:pull c:d:push", "x": 'q"uo,te'}
        ),
    ]
    assert auth.parse_www_authenticate(["Basic", "", "  "]) == [Challenge("basic", {})]


def test_token_requests() -> None:
    ch = Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})
    scope = auth.merge_scopes("repository:a:pull", "repository:a:pull repository:b:pull")
    assert scope == "repository:a:pull repository:b:pull"
    anon = auth.token_request(ch, scope, None)
    assert (anon.method, anon.params, anon.authorization) == ("GET", {"service": "reg", "scope": scope}, None)
    basic = auth.token_request(ch, scope, Credentials("u", "p"))
    assert basic.authorization == "Basic " + _b64("u:p")
    oauth = auth.token_request(ch, scope, Credentials("", "refresh-1"))
    assert oauth.method == "POST" and oauth.params["grant_type"] == "refresh_token"
    assert oauth.params["refresh_token"] == "refresh-1" and oauth.authorization is None
    with pytest.raises(errdefs.PermissionDenied):
        auth.token_request(Challenge("bearer", {"realm": "/relative"}), scope, None)
    assert auth.parse_token_response(b'{"access_token":"t","expires_in":3}') == ("t", 60)
    assert auth.parse_token_response(b'{"token":"t","expires_in":600}') == ("t", 600)
    with pytest.raises(errdefs.PermissionDenied):
        auth.parse_token_response(b"{}")


# ------------------------------------------------------------------------- registry errors


def test_registry_error_categories() -> None:
    body = json.dumps(
        {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"Tag": "x"}}]}
    )
    nf = errors.for_response(404, "Not Found", body.encode(), what="r:x", registry="reg")
    assert isinstance(nf, errdefs.NotFound) and "MANIFEST_UNKNOWN: manifest unknown" in str(nf)
    denied = errors.for_response(401, "Unauthorized", b"", what="r:x", registry="reg:5000")
    assert isinstance(denied, errdefs.PermissionDenied) and str(denied).startswith("unauthorized: reg:5000")
    assert isinstance(
        errors.for_response(403, "Forbidden", b"", what="w", registry="r"), errdefs.PermissionDenied
    )
    bad = json.dumps({"errors": [{"code": "DIGEST_INVALID", "message": "provided digest did not match"}]})
    mismatch = errors.for_response(400, "Bad Request", bad.encode(), what="w", registry="r")
    assert isinstance(mismatch, errdefs.FailedPrecondition) and "digest mismatch" in str(mismatch)
    assert isinstance(
        errors.for_response(503, "Unavailable", b"<html>", what="w", registry="r"), errdefs.Unavailable
    )
    assert isinstance(errors.for_response(429, "Too Many", b"", what="w", registry="r"), errdefs.Unavailable)
    assert isinstance(errors.for_response(400, "Bad", b"x", what="w", registry="r"), errdefs.InvalidArgument)
    assert isinstance(errors.for_response(405, "No", b"", what="w", registry="r"), errdefs.NotImplementedErr)
    assert errors.describe(502, "Bad Gateway", b"<html>proxy</html>") == "502 Bad Gateway"


def test_descriptors_and_media_types() -> None:
    entry = {
        "mediaType": registry.MT_OCI_MANIFEST,
        "digest": D,
        "size": 7,
        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
        "annotations": {"k": "v"},
    }
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": registry.MT_OCI_INDEX, "manifests": [entry]}
    ).encode()
    (child,) = registry.children(registry.MT_OCI_INDEX, index)
    assert child.platform == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert child.to_dict() == entry and registry.Descriptor.from_dict(entry) == child
    assert registry.media_type_of(index) == registry.MT_OCI_INDEX
    assert registry.media_type_of(b'{"schemaVersion":2,"manifests":[]}') == registry.MT_OCI_INDEX
    assert registry.media_type_of(b'{"schemaVersion":2,"config":{},"layers":[]}') == registry.MT_OCI_MANIFEST
    assert registry.media_type_of(b'{"schemaVersion":1,"fsLayers":[]}') in registry.SCHEMA1_TYPES
    with pytest.raises(errdefs.InvalidArgument):
        registry.Descriptor.from_dict({"digest": "nope", "size": 1})


def test_scopes_merge_actions_per_resource() -> None:
    assert auth.merge_scopes("repository:a:push", "repository:a:pull repository:b:pull") == (
        "repository:a:pull,push repository:b:pull"
    )
    assert auth.merge_scopes("", "registry:catalog:*") == "registry:catalog:*"


def test_authorizer_caches_and_refreshes_tokens() -> None:
    fetched: list[auth.TokenRequest] = []

    async def fetch_token(req: auth.TokenRequest) -> bytes:
        fetched.append(req)
        return json.dumps({"token": f"t{len(fetched)}", "expires_in": 300}).encode()

    async def creds(host: str) -> Credentials | None:
        return Credentials("u", "p") if host == "basic.example" else None

    async def main() -> None:
        a = auth.Authorizer(creds, fetch_token)
        pull = "repository:x:pull"
        assert await a.header("reg.example", pull) is None  # nothing learnt yet: anonymous
        challenge = 'Bearer realm="https://auth.example/token",service="reg",scope="repository:x:pull"'
        assert await a.on_unauthorized("reg.example", pull, [challenge], "reg.example", None) == "Bearer t1"
        assert await a.header("reg.example", pull) == "Bearer t1"  # cached, sent up front
        assert len(fetched) == 1
        # The server refused t1: it is replaced, not sent again.
        assert (
            await a.on_unauthorized("reg.example", pull, [challenge], "reg.example", "Bearer t1")
            == "Bearer t2"
        )
        # Another repository: a token for its scope alone, fetched before the request goes out.
        assert await a.header("reg.example", "repository:y:pull,push") == "Bearer t3"
        assert fetched[-1].params["scope"] == "repository:y:pull,push"
        with pytest.raises(errdefs.PermissionDenied, match="requires credentials"):
            await a.on_unauthorized("anon.example", pull, ['Basic realm="r"'], "anon.example", None)
        basic = await a.on_unauthorized("basic.example", pull, ['Basic realm="r"'], "basic.example", None)
        assert basic == "Basic " + _b64("u:p") == await a.header("basic.example", "repository:z:pull")
        with pytest.raises(errdefs.PermissionDenied, match="no supported"):
            await a.on_unauthorized("reg.example", pull, ["Negotiate abc"], "reg.example", None)

    asyncio.run(main())
