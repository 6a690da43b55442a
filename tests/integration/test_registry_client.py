"""RegistryClient against Debian's distribution registry on 127.0.0.1.

Three real registries: an open one, one with htpasswd (Basic) auth, and one on TLS that requires
a client certificate. What a real registry cannot be made to do (a Bearer token service, a
connection dropped mid-blob, an S3-style redirect) is done by small aiohttp servers in front of
the open registry, proxying everything else to it. The image is busybox-static packed by umoci
and pushed with skopeo; what we push is read back with skopeo.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
import uvloop
from aiohttp import web

from pyctr.api import errdefs
from pyctr.daemon.remotes import (
    Credentials,
    Descriptor,
    RegistryClient,
    children,
    docker_config_func,
    parse,
    static_credentials,
)
from pyctr.daemon.remotes.registry import MT_OCI_INDEX
from tests.helpers import images
from tests.helpers.registry import free_port

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("docker-registry", "skopeo", "umoci")),
    reason="docker-registry, skopeo and umoci are needed (make setup installs them as root)",
)

T = TypeVar("T")
USER, PASSWORD = "pyctr", "s3cret-pw"
REPO = "library/busybox"


def run(coro: Awaitable[T]) -> T:
    return uvloop.run(coro)  # type: ignore[arg-type]  # the daemon's loop, not asyncio's default


# ----------------------------------------------------------------------------- the registries


@dataclass
class Registry:
    """A ``docker-registry serve`` process we started, stopped by its PID."""

    base: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def blob_file(self, digest: str) -> Path:
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_registry(base: Path, extra: str = "") -> Registry:
    """docker-registry on a free port with temp storage; ``extra`` is YAML added to it."""
    base.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        cfg = base / "config.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n{extra}"
        )
        with open(base / "registry.log", "ab") as log:
            proc = subprocess.Popen(
                ["docker-registry", "serve", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        reg = Registry(base, port, proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if _listening(port):
                return reg
            time.sleep(0.05)
        reg.stop()
    raise RuntimeError(f"docker-registry did not come up: {(base / 'registry.log').read_text()}")


def skopeo(*args: str) -> str:
    res = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (the registry accepts nothing else): htpasswd, else libcrypt."""
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbB", "-C", "4", user, password], capture_output=True, text=True)
        return out.stdout.strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # deprecated, gone in 3.13; bcrypt through libxcrypt
    except ImportError:
        pytest.skip("neither htpasswd (apache2-utils) nor the crypt module is available")

    return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        f"{d}/ca.key",
        "-out",
        f"{d}/ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=pyctr-ca",
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", *ec, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-out", f"{d}/{name}.crt", "-days", "2", "-extfile", f"{d}/{name}.ext",
        )  # fmt: skip


@dataclass
class Pushed:
    """What the busybox image looks like once in a registry."""

    layout: Path
    manifest: Descriptor
    config: Descriptor
    layer: Descriptor

    def blob(self, desc: Descriptor) -> bytes:
        return (self.layout / "blobs" / "sha256" / desc.digest.split(":", 1)[1]).read_bytes()


@dataclass
class Env:
    work: Path
    image: Pushed
    open: Registry
    basic: Registry
    tls: Registry

    def ref(self, reg: Registry, repo: str = REPO, tag: str = "latest") -> str:
        return f"{reg.host}/{repo}:{tag}"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    work = Path(tempfile.mkdtemp(prefix="registry-client-", dir="/tmp"))
    regs: list[Registry] = []
    try:
        built = images.build_busybox(str(work))
        layout = Path(built.layout)
        index = json.loads((layout / "index.json").read_text())
        manifest = Descriptor.from_dict(index["manifests"][0])
        mbytes = (layout / "blobs" / "sha256" / manifest.digest.split(":", 1)[1]).read_bytes()
        config, layer = children(manifest.media_type, mbytes)
        image = Pushed(layout, manifest, config, layer)

        (work / "auth").mkdir()
        (work / "auth" / "htpasswd").write_text(htpasswd_line(USER, PASSWORD) + "\n")
        pki = work / "pki"
        pki.mkdir()
        make_pki(pki)
        regs.append(start_registry(work / "open"))
        regs.append(
            start_registry(
                work / "basic",
                f"auth:\n  htpasswd:\n    realm: pyctr-test\n    path: {work / 'auth' / 'htpasswd'}\n",
            )
        )
        regs.append(
            start_registry(
                work / "tls",
                f"  tls:\n    certificate: {pki}/server.crt\n    key: {pki}/server.key\n"
                f"    clientcas:\n      - {pki}/ca.crt\n",
            )
        )
        e = Env(work, image, *regs)
        src = f"oci:{layout}:latest"
        skopeo("copy", "--quiet", "--dest-tls-verify=false", src, f"docker://{e.ref(e.open)}")
        skopeo(
            "copy", "--quiet", "--dest-tls-verify=false", f"--dest-creds={USER}:{PASSWORD}",
            src, f"docker://{e.ref(e.basic)}",
        )  # fmt: skip
        certs = work / "skopeo-certs"  # Docker's certs.d layout: *.crt CAs, *.cert + *.key client
        certs.mkdir()
        for src_name, name in (
            ("ca.crt", "ca.crt"),
            ("client.crt", "client.cert"),
            ("client.key", "client.key"),
        ):
            shutil.copy(pki / src_name, certs / name)
        skopeo("copy", "--quiet", f"--dest-cert-dir={certs}", src, f"docker://{e.ref(e.tls)}")
        yield e
    finally:
        for r in regs:
            r.stop()
        shutil.rmtree(work, ignore_errors=True)


async def read_all(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in it])


# ------------------------------------------------------------------------- the open registry


def test_resolve_by_tag_and_digest(env: Env) -> None:
    async def main() -> None:
        async with RegistryClient() as client:  # 127.0.0.1: plain http without being told
            ref = parse(env.ref(env.open))
            name, desc = await client.resolve(ref)
            assert name == f"{env.open.host}/{REPO}:latest"
            m = env.image.manifest
            assert desc == Descriptor(m.media_type, m.digest, m.size)
            pinned = ref.with_digest(desc.digest)
            name2, desc2 = await client.resolve(pinned)
            assert name2 == str(pinned) and desc2.digest == desc.digest and desc2.size == desc.size

    run(main())


def test_fetch_manifest_config_and_layer(env: Env) -> None:
    img = env.image

    async def main() -> None:
        async with RegistryClient() as client:
            ref = parse(env.ref(env.open))
            _, desc = await client.resolve(ref)
            manifest = await client.fetch_bytes(ref, desc)
            assert manifest == img.blob(img.manifest)
            config_desc, layer_desc = children(desc.media_type, manifest)
            config = await client.fetch_bytes(ref, config_desc)
            assert json.loads(config)["architecture"] == "amd64"
            pieces = [p async for p in client.fetch(ref, layer_desc)]
            assert b"".join(pieces) == img.blob(img.layer)
            # Pieces of at least a MiB, but for the last one.
            assert all(len(p) >= 1 << 20 for p in pieces[:-1])
            # Resume from an offset: Range on the registry.
            tail = await read_all(client.fetch(ref, layer_desc, offset=1_000_000))
            assert tail == img.blob(img.layer)[1_000_000:]
            assert await read_all(client.fetch(ref, layer_desc, offset=layer_desc.size)) == b""
            with pytest.raises(errdefs.ResourceExhausted):
                await client.fetch_bytes(ref, layer_desc, limit=1 << 20)

    run(main())


def test_not_found_and_size_mismatch(env: Env) -> None:
    img = env.image

    async def main() -> None:
        async with RegistryClient() as client:
            missing = parse(env.ref(env.open, tag="no-such-tag"))
            with pytest.raises(errdefs.NotFound) as exc:
                await client.resolve(missing)
            assert str(exc.value) == f"{missing}: not found"
            with pytest.raises(errdefs.NotFound):
                await client.resolve(parse(env.ref(env.open, repo="no/such-repo")))
            ref = parse(env.ref(env.open))
            absent = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 10)
            with pytest.raises(errdefs.NotFound):
                await read_all(client.fetch(ref, absent))
            with pytest.raises(errdefs.NotFound):
                await client.fetch_bytes(ref, Descriptor(img.manifest.media_type, absent.digest, 10))
            # The registry announces fewer bytes than the descriptor says.
            longer = Descriptor(img.config.media_type, img.config.digest, img.config.size + 10)
            with pytest.raises(errdefs.FailedPrecondition, match="size mismatch"):
                await client.fetch_bytes(ref, longer)

    run(main())


def test_digest_mismatch_from_a_corrupted_blob(env: Env) -> None:
    data = b'{"pyctr":"' + secrets.token_hex(16).encode() + b'"}'
    desc = Descriptor(
        "application/vnd.oci.image.config.v1+json", "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
    )

    async def main() -> None:
        async with RegistryClient() as client:
            ref = parse(env.ref(env.open, repo="corrupt/blob"))
            await client.push_blob(ref, desc, data)
            assert await client.fetch_bytes(ref, desc) == data
            # Flip one byte where the registry keeps the blob: it serves what is on disk.
            path = env.open.blob_file(desc.digest)
            path.write_bytes(data[:-2] + b"!" + data[-1:])
            with pytest.raises(errdefs.FailedPrecondition, match="digest mismatch"):
                await client.fetch_bytes(ref, desc)

    run(main())


async def _chunks(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


async def _must_not_be_read() -> AsyncIterator[bytes]:
    raise AssertionError("push_blob read a blob the registry already has")
    yield b""  # pragma: no cover - makes this an async generator


def test_push_image_and_index_then_read_back_with_skopeo(env: Env) -> None:
    img = env.image
    layer, config = img.blob(img.layer), img.blob(img.config)
    manifest = img.blob(img.manifest)
    platform = {"os": "linux", "architecture": "amd64"}
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_INDEX,
            "manifests": [{**img.manifest.to_dict(), "platform": platform}],
        }
    ).encode()
    index_desc = Descriptor(MT_OCI_INDEX, "sha256:" + hashlib.sha256(index).hexdigest(), len(index))

    async def main() -> None:
        async with RegistryClient() as client:
            ref = parse(f"{env.open.host}/pushed/busybox:v1")
            await client.push_blob(ref, img.layer, _chunks(layer))  # streamed
            await client.push_blob(ref, img.config, config)  # whole
            await client.push_blob(ref, img.layer, _must_not_be_read())  # already there: skipped
            await client.push_manifest(ref, img.manifest, manifest)
            # An index over it, tagged; the manifest itself is pushed by digest first.
            await client.push_manifest(ref.with_digest(img.manifest.digest), img.manifest, manifest)
            await client.push_manifest(ref.with_tag("multi"), index_desc, index)
            _, top = await client.resolve(ref.with_tag("multi"))
            assert top == Descriptor(MT_OCI_INDEX, index_desc.digest, index_desc.size)
            (entry,) = children(top.media_type, await client.fetch_bytes(ref, top))
            assert entry.platform == platform and entry.digest == img.manifest.digest

            # Bytes that do not match their descriptor never reach the registry ...
            other = b"not yet in the registry " + secrets.token_bytes(8)
            absent = Descriptor("x", "sha256:" + hashlib.sha256(other).hexdigest(), len(other))
            with pytest.raises(errdefs.FailedPrecondition, match="digest mismatch"):
                await client.push_blob(ref, absent, other[::-1])
            with pytest.raises(errdefs.FailedPrecondition, match="digest mismatch"):
                await client.push_manifest(ref, img.manifest, manifest + b" ")
            # ... and a stream that does not is refused by it (DIGEST_INVALID).
            fake = Descriptor("x", "sha256:" + hashlib.sha256(b"other").hexdigest(), len(config))
            with pytest.raises(errdefs.FailedPrecondition, match="digest mismatch"):
                await client.push_blob(ref, fake, _chunks(config))
            # A stream shorter than its descriptor is stopped before the registry sees a blob.
            short = Descriptor("x", absent.digest, len(other) + 5)
            with pytest.raises(errdefs.FailedPrecondition, match="expected"):
                await client.push_blob(ref, short, _chunks(other))

    run(main())
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{env.open.host}/pushed/busybox:v1")
    assert raw.encode() == manifest
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{env.open.host}/pushed/busybox:v1"))
    assert info["Architecture"] == "amd64" and info["Digest"] == img.manifest.digest
    assert info["Layers"] == [img.layer.digest]
    multi = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{env.open.host}/pushed/busybox:multi")
    assert multi.encode() == index


def test_mirrors_from_hosts_toml(env: Env, tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there: the first mirror fails to connect
    (tmp_path / "registry.invalid").mkdir()
    (tmp_path / "registry.invalid" / "hosts.toml").write_text(
        'server = "https://registry.invalid"\n'
        f'[host."http://127.0.0.1:{dead}"]\n  capabilities = ["pull", "resolve"]\n'
        f'[host."http://{env.open.host}"]\n  capabilities = ["pull", "resolve"]\n'
    )

    async def main() -> None:
        async with RegistryClient(config_dir=str(tmp_path), max_retries=0) as client:
            ref = parse(f"registry.invalid/{REPO}:latest")
            _, desc = await client.resolve(ref)
            assert desc.digest == env.image.manifest.digest
            assert await client.fetch_bytes(ref, desc) == env.image.blob(env.image.manifest)
            # Push goes to the first host that may push: the server, which does not exist.
            with pytest.raises(errdefs.Unavailable):
                await client.push_manifest(ref, desc, env.image.blob(env.image.manifest))

    run(main())


# ---------------------------------------------------------------------------- basic auth


def test_basic_auth(env: Env, tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    cfg.write_text(json.dumps({"auths": {env.basic.host: {"auth": token}}}))

    async def main() -> None:
        ref = parse(env.ref(env.basic))
        async with RegistryClient() as anonymous:
            with pytest.raises(errdefs.PermissionDenied) as exc:
                await anonymous.resolve(ref)
            assert str(exc.value).startswith("unauthorized:") and env.basic.host in str(exc.value)
        wrong = static_credentials({env.basic.host: Credentials(USER, "wrong")})
        async with RegistryClient(credentials=wrong) as client:
            with pytest.raises(errdefs.PermissionDenied, match="unauthorized"):
                await client.resolve(ref)
        good = static_credentials({env.basic.host: Credentials(USER, PASSWORD)})
        async with RegistryClient(credentials=good) as client:
            _, desc = await client.resolve(ref)
            assert await client.fetch_bytes(ref, desc) == env.image.blob(env.image.manifest)
            layer = await read_all(client.fetch(ref, env.image.layer))
            assert layer == env.image.blob(env.image.layer)
            # Push with the same credentials (Basic covers every scope).
            pushed = parse(f"{env.basic.host}/pushed/config:v1")
            await client.push_blob(pushed, env.image.config, env.image.blob(env.image.config))
        async with RegistryClient(credentials=docker_config_func(str(cfg))) as client:
            _, desc = await client.resolve(ref)
            assert desc.digest == env.image.manifest.digest

    run(main())


# ------------------------------------------------------------------------------------- TLS


def test_tls_with_ca_and_client_certificate(env: Env, tmp_path: Path) -> None:
    pki = env.work / "pki"
    d = tmp_path / f"127.0.0.1_{env.tls.port}_"

    def configure(text: str) -> None:
        d.mkdir(exist_ok=True)
        (d / "hosts.toml").write_text(f'server = "https://{env.tls.host}"\n' + text)

    async def resolve() -> Descriptor:
        async with RegistryClient(config_dir=str(tmp_path), max_retries=0) as client:
            ref = parse(env.ref(env.tls))
            _, desc = await client.resolve(ref)
            assert await client.fetch_bytes(ref, desc) == env.image.blob(env.image.manifest)
            return desc

    async def main() -> None:
        configure(f'ca = "{pki}/ca.crt"\nclient = [["{pki}/client.crt", "{pki}/client.key"]]\n')
        assert (await resolve()).digest == env.image.manifest.digest
        configure(f'skip_verify = true\nclient = [["{pki}/client.crt", "{pki}/client.key"]]\n')
        assert (await resolve()).digest == env.image.manifest.digest
        configure(f'ca = "{pki}/ca.crt"\n')  # no client certificate: the server refuses us
        with pytest.raises(errdefs.Unavailable):
            await resolve()
        configure(f'client = [["{pki}/client.crt", "{pki}/client.key"]]\n')  # no CA: we refuse it
        with pytest.raises(errdefs.Unavailable, match="tls"):
            await resolve()

    run(main())


# -------------------------------------------------------- aiohttp fronts for what cannot be real


@dataclass
class TokenServer:
    """A token endpoint: anonymous tokens allow pull, tokens for USER/PASSWORD or the refresh
    token allow pull and push. Tokens are random and remembered with their scopes."""

    refresh_token: str = "refresh-" + secrets.token_hex(4)
    granted: dict[str, set[str]] = field(default_factory=dict)
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, scope, had creds)

    def _grant(self, scopes: str, may_push: bool) -> web.Response:
        token = secrets.token_hex(16)
        allowed = set()
        for scope in scopes.split():
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            for action in actions.split(","):
                if action == "pull" or may_push:
                    allowed.add(f"{kind}:{repo}:{action}")
        self.granted[token] = allowed
        return web.json_response({"token": token, "expires_in": 300})

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            form = await request.post()
            self.requests.append(("POST", str(form.get("scope", "")), True))
            if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != self.refresh_token:
                return web.json_response({"error": "invalid_grant"}, status=401)
            return self._grant(str(form.get("scope", "")), True)
        scopes = " ".join(request.query.getall("scope", []))
        header = request.headers.get("Authorization", "")
        self.requests.append(("GET", scopes, bool(header)))
        if header:
            if header != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
                return web.json_response({"details": "incorrect username or password"}, status=401)
            return self._grant(scopes, True)
        return self._grant(scopes, False)


@dataclass
class Front:
    """A registry front on 127.0.0.1 proxying to ``upstream``, with faults switched on by field."""

    upstream: str
    tokens: TokenServer | None = None
    token_url: str = ""
    drop_after: int = 0  # close the connection after this many bytes of a blob GET
    drops_left: int = 0
    drop_ranged: int = -1  # if >= 0: drop resumed (ranged) requests too, after this many bytes
    redirect_to: str = ""  # 307 blob GETs to this origin (another host)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path_qs, Range)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    origin: str = ""

    def _required(self, request: web.Request) -> str | None:
        parts = request.path.split("/")
        if len(parts) < 4:
            return None  # /v2/ itself
        for i, p in enumerate(parts):
            if p in ("manifests", "blobs"):
                repo = "/".join(parts[2:i])
                action = "pull" if request.method in ("GET", "HEAD") else "push"
                return f"repository:{repo}:{action}"
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, request.headers.get("Range", "")))
        self.headers_seen.append(dict(request.headers))
        if self.tokens is not None:
            need = self._required(request)
            header = request.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ")
            if need and (
                not header.startswith("Bearer ") or need not in self.tokens.granted.get(token, set())
            ):
                repo_scope, _, action = need.rpartition(":")
                scope = f"{repo_scope}:{'pull' if action == 'pull' else 'pull,push'}"
                challenge = f'Bearer realm="{self.token_url}",service="pyctr-test",scope="{scope}"'
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                    status=401,
                    headers={"WWW-Authenticate": challenge},
                )
        is_blob_get = request.method == "GET" and "/blobs/sha256:" in request.path
        if is_blob_get and self.redirect_to:
            digest = request.path.rsplit("/", 1)[1]
            return web.Response(
                status=307, headers={"Location": f"{self.redirect_to}/store/{digest}?sig=a%2Fb%3D"}
            )
        if is_blob_get and self.drops_left and (self.drop_ranged >= 0 or "Range" not in request.headers):
            self.drops_left -= 1
            return await self._drop(request)
        return await self._proxy(request)

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization")}
        body = await request.read()
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=io.BytesIO(body) if body else None,
                allow_redirects=False,
            ) as up,
        ):
            data = await up.read()
            keep = (
                "Content-Type",
                "Docker-Content-Digest",
                "Content-Range",
                "Location",
                "Docker-Upload-UUID",
                "Range",
            )
            out = {k: up.headers[k] for k in keep if k in up.headers}
            if "Location" in out:
                out["Location"] = out["Location"].replace(self.upstream, self.origin)
            if request.method == "HEAD":
                out["Content-Length"] = up.headers.get("Content-Length", "0")
                return web.Response(status=up.status, headers=out)
            return web.Response(status=up.status, body=data, headers=out)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        ranged = {"Range": request.headers["Range"]} if "Range" in request.headers else {}
        async with aiohttp.ClientSession() as s, s.get(self.upstream + request.path_qs, headers=ranged) as up:
            data = await up.read()
            status, extra = up.status, {k: up.headers[k] for k in ("Content-Range",) if k in up.headers}
        resp = web.StreamResponse(
            status=status, headers={"Content-Type": "application/octet-stream", **extra}
        )
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: self.drop_ranged if "Range" in request.headers else self.drop_after])
        assert request.transport is not None
        request.transport.close()  # the bytes written so far go out, then the connection ends
        return resp


async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_bearer_token_flow_and_cache(env: Env) -> None:
    img = env.image

    async def main() -> None:
        tokens = TokenServer()
        token_runner, token_origin = await serve(tokens.handle)
        front = Front(upstream=f"http://{env.open.host}", tokens=tokens, token_url=f"{token_origin}/token")
        front_runner, front.origin = await serve(front.handle)
        host = front.origin.removeprefix("http://")
        try:
            ref = parse(f"{host}/{REPO}:latest")
            async with RegistryClient() as client:  # anonymous: a pull token
                _, desc = await client.resolve(ref)
                assert await client.fetch_bytes(ref, desc) == img.blob(img.manifest)
                assert await read_all(client.fetch(ref, img.layer)) == img.blob(img.layer)
                # One token for the whole pull: later requests sent it up front.
                assert [r[:2] for r in tokens.requests] == [("GET", f"repository:{REPO}:pull")]
                heads = [s for s in front.seen if s[0] == "HEAD"]
                assert len(heads) == 2  # the anonymous HEAD (401), then the one with the token
                # A push needs a pull,push token, which anonymous users do not get.
                with pytest.raises(errdefs.PermissionDenied, match="unauthorized"):
                    await client.push_blob(parse(f"{host}/pushed/anon:v1"), img.config, img.blob(img.config))
            creds = static_credentials({host: Credentials(USER, PASSWORD)})
            async with RegistryClient(credentials=creds) as client:
                target = parse(f"{host}/pushed/bearer:v1")
                await client.push_blob(target, img.layer, _chunks(img.blob(img.layer)))
                await client.push_blob(target, img.config, img.blob(img.config))
                await client.push_manifest(target, img.manifest, img.blob(img.manifest))
                _, desc = await client.resolve(target)
                assert desc.digest == img.manifest.digest
            assert ("GET", "repository:pushed/bearer:pull,push", True) in tokens.requests
            refresh = static_credentials({host: Credentials("", tokens.refresh_token)})
            async with RegistryClient(credentials=refresh) as client:  # OAuth2 refresh token
                await client.push_manifest(target.with_tag("v2"), img.manifest, img.blob(img.manifest))
                assert tokens.requests[-1][0] == "POST"
            bad = static_credentials({host: Credentials(USER, "nope")})
            async with RegistryClient(credentials=bad) as client:
                with pytest.raises(errdefs.PermissionDenied, match="token server"):
                    await client.resolve(ref)
        finally:
            await front_runner.cleanup()
            await token_runner.cleanup()
        info = json.loads(
            skopeo("inspect", "--tls-verify=false", f"docker://{env.open.host}/pushed/bearer:v2")
        )
        assert info["Digest"] == img.manifest.digest

    run(main())


def test_redirected_blobs_do_not_carry_the_registry_token(env: Env) -> None:
    img = env.image

    async def main() -> None:
        store_requests: list[tuple[str, str | None]] = []

        async def store(request: web.Request) -> web.StreamResponse:
            # A presigned URL must arrive byte for byte and without the registry's token.
            store_requests.append((request.raw_path, request.headers.get("Authorization")))
            digest = request.path.rsplit("/", 1)[1]
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://{env.open.host}/v2/{REPO}/blobs/{digest}") as up,
            ):
                return web.Response(body=await up.read(), content_type="application/octet-stream")

        tokens = TokenServer()
        token_runner, token_origin = await serve(tokens.handle)
        store_runner, store_origin = await serve(store)
        front = Front(
            upstream=f"http://{env.open.host}",
            tokens=tokens,
            token_url=f"{token_origin}/token",
            redirect_to=store_origin,
        )
        front_runner, front.origin = await serve(front.handle)
        try:
            ref = parse(f"{front.origin.removeprefix('http://')}/{REPO}:latest")
            async with RegistryClient() as client:
                assert await read_all(client.fetch(ref, img.layer)) == img.blob(img.layer)
                assert await client.fetch_bytes(ref, img.config) == img.blob(img.config)
        finally:
            for r in (front_runner, store_runner, token_runner):
                await r.cleanup()
        assert store_requests == [
            (f"/store/{img.layer.digest}?sig=a%2Fb%3D", None),
            (f"/store/{img.config.digest}?sig=a%2Fb%3D", None),
        ]
        # The registry itself did get the token (the 307 came after authorization).
        assert tokens.requests

    run(main())


def test_dropped_connection_resumes_with_range(env: Env) -> None:
    img = env.image
    blob = img.blob(img.layer)

    async def main() -> None:
        front = Front(upstream=f"http://{env.open.host}", drop_after=300_000, drops_left=1)
        runner, front.origin = await serve(front.handle)
        try:
            ref = parse(f"{front.origin.removeprefix('http://')}/{REPO}:latest")
            async with RegistryClient() as client:
                pieces = [p async for p in client.fetch(ref, img.layer)]
                assert b"".join(pieces) == blob
                # What arrived before the drop was kept, and the rest was asked for with Range.
                assert len(pieces[0]) == 300_000
                gets = [(path, rng) for m, path, rng in front.seen if m == "GET"]
                blob_path = f"/v2/{REPO}/blobs/{img.layer.digest}"
                assert gets == [(blob_path, ""), (blob_path, "bytes=300000-")]
            # Resumed requests that bring nothing count against max_retries; then the fetch gives
            # up as Unavailable, having passed on every byte that did arrive.
            front.drops_left, front.drop_after, front.drop_ranged = 100, 1000, 0
            front.seen.clear()
            async with RegistryClient(max_retries=2) as client:
                got = bytearray()
                with pytest.raises(errdefs.Unavailable, match="2 retries without progress"):
                    async for p in client.fetch(ref, img.layer):
                        got += p
                assert bytes(got) == blob[:1000]
                assert [rng for _, _, rng in front.seen] == [""] + ["bytes=1000-"] * 3
        finally:
            await runner.cleanup()

    run(main())


def test_mirror_gets_ns_and_configured_headers(env: Env, tmp_path: Path) -> None:
    async def main() -> None:
        front = Front(upstream=f"http://{env.open.host}")
        runner, front.origin = await serve(front.handle)
        (tmp_path / "_default").mkdir()
        (tmp_path / "_default" / "hosts.toml").write_text(
            f'[host."{front.origin}"]\n  capabilities = ["pull", "resolve"]\n  header = {{ x-mirror = ["a", "b"] }}\n'
        )
        try:
            async with RegistryClient(
                config_dir=str(tmp_path), headers={"X-Client": "c"}, user_agent="pyctr-test/1"
            ) as client:
                ref = parse(f"upstream.invalid/{REPO}:latest")
                _, desc = await client.resolve(ref)
                assert desc.digest == env.image.manifest.digest
        finally:
            await runner.cleanup()
        method, path_qs, _ = front.seen[0]
        assert (method, path_qs) == ("HEAD", f"/v2/{REPO}/manifests/latest?ns=upstream.invalid")
        sent = front.headers_seen[0]
        assert sent["x-mirror"] == "a, b" and sent["X-Client"] == "c" and sent["User-Agent"] == "pyctr-test/1"
        assert sent["Accept"].startswith("application/vnd.oci.image.index.v1+json")

    run(main())
