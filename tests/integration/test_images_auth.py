"""``pyctr images pull|push`` against a registry that wants credentials (htpasswd, Basic).

The daemon pulls and pushes; the credentials come from the pyctr client over the transfer's
auth stream (AuthRequest{host} -> AuthResponse), from ``--user`` (the password typed at a
terminal prompt when left out) or from Docker's config.json (``$DOCKER_CONFIG`` or
``$HOME/.docker``). Every test runs pyctr with its own empty HOME, so nobody's real Docker
config takes part, and checks that the password shows up in no output and no daemon log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pty
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.helpers import daemons, images, registry
from tests.helpers.registry import Registry

USER, PASSWORD = "pyctr", "Pw-7f3a-only-in-this-test"
WRONG = "Wrong-9c1e-password"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("docker-registry", "skopeo", "umoci")),
    reason="docker-registry, skopeo and umoci are needed (make setup installs them as root)",
)


@pytest.fixture(scope="module")
def auth_registry(built_images: images.Images) -> Iterator[tuple[Registry, str]]:
    """(registry, reference of busybox in it); the registry accepts USER/PASSWORD only."""
    reg = registry.start_with_htpasswd(USER, PASSWORD)
    try:
        ref = registry.push_with_credentials(
            reg, built_images.busybox.layout, "private/busybox", USER, PASSWORD
        )
        yield reg, ref
    finally:
        reg.stop()


@pytest.fixture
def home() -> Iterator[str]:
    """An empty HOME for pyctr: no ~/.docker/config.json unless a test writes one."""
    path = tempfile.mkdtemp(prefix="pyctr-home-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pyctr(
    d: daemons.Daemon, home: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {"HOME": home, "DOCKER_CONFIG": "", **(env or {})}
    return daemons.run([daemons.PYCTR, "-a", d.address, "-n", "auth", *args], timeout=60, env=full)


def image_names(d: daemons.Daemon, home: str) -> list[str]:
    r = pyctr(d, home, "images", "ls", "-q")
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def assert_no_secret(d: daemons.Daemon, *texts: str) -> None:
    for secret in (PASSWORD, WRONG, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert secret not in d.log(), "a credential reached the daemon's log"
        for text in texts:
            assert secret not in text, "a credential reached pyctr's output"


def write_config(directory: str, doc: dict[str, object]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(doc, f)


# ------------------------------------------------------------------------------------- pull


def test_pull_with_user(pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str) -> None:
    _, ref = auth_registry
    r = pyctr(pyctrd, home, "images", "pull", "--plain", "--user", f"{USER}:{PASSWORD}", ref)
    assert r.returncode == 0, r.stderr
    assert ref in image_names(pyctrd, home)
    check = pyctr(pyctrd, home, "images", "check")
    assert "complete" in check.stdout, check.stdout
    assert_no_secret(pyctrd, r.stdout, r.stderr)


def test_pull_without_credentials_is_unauthorized(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str
) -> None:
    reg, ref = auth_registry
    r = pyctr(pyctrd, home, "images", "pull", "--plain", ref)
    assert r.returncode != 0
    assert r.stderr.startswith("pyctr: unauthorized:") and reg.host in r.stderr, r.stderr
    assert ref not in image_names(pyctrd, home)


def test_pull_wrong_password_is_unauthorized(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str
) -> None:
    reg, ref = auth_registry
    r = pyctr(pyctrd, home, "images", "pull", "--plain", "--user", f"{USER}:{WRONG}", ref)
    assert r.returncode != 0
    assert r.stderr.startswith("pyctr: unauthorized:") and reg.host in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr  # one clear line, no traceback
    assert ref not in image_names(pyctrd, home)
    assert_no_secret(pyctrd, r.stdout, r.stderr)


def _auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "where, key, entry",
    [
        # $DOCKER_CONFIG/config.json, the host as key, base64 "auth"
        ("docker_config", "{host}", _auth_entry(USER, PASSWORD)),
        # $HOME/.docker/config.json, a URL as key, username and password
        ("home", "http://{host}/v2/", {"username": USER, "password": PASSWORD}),
    ],
)
def test_pull_with_docker_config(
    pyctrd: daemons.Daemon,
    auth_registry: tuple[Registry, str],
    home: str,
    where: str,
    key: str,
    entry: dict[str, str],
) -> None:
    reg, ref = auth_registry
    doc = {"auths": {"other.example:5000": _auth_entry("x", "y"), key.format(host=reg.host): entry}}
    env = {}
    if where == "docker_config":
        env["DOCKER_CONFIG"] = os.path.join(home, "elsewhere")
        write_config(env["DOCKER_CONFIG"], doc)
    else:
        write_config(os.path.join(home, ".docker"), doc)
    r = pyctr(pyctrd, home, "images", "pull", "--plain", ref, env=env)
    assert r.returncode == 0, r.stderr
    assert ref in image_names(pyctrd, home)
    assert_no_secret(pyctrd, r.stdout, r.stderr)


def test_docker_config_for_another_host_is_not_sent(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str
) -> None:
    _, ref = auth_registry
    write_config(os.path.join(home, ".docker"), {"auths": {"127.0.0.2:1": _auth_entry(USER, PASSWORD)}})
    r = pyctr(pyctrd, home, "images", "pull", "--plain", ref)
    assert r.returncode != 0 and r.stderr.startswith("pyctr: unauthorized:"), r.stderr


def test_broken_docker_config_is_a_clear_error(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str
) -> None:
    _, ref = auth_registry
    os.makedirs(os.path.join(home, ".docker"))
    with open(os.path.join(home, ".docker", "config.json"), "w") as f:
        f.write('{"auths": ')
    r = pyctr(pyctrd, home, "images", "pull", "--plain", ref)
    assert r.returncode != 0
    assert "config.json" in r.stderr and "not JSON" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the password prompt


def test_password_prompt_on_a_terminal(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str
) -> None:
    """``--user USER`` asks for the password on the terminal, without echoing it."""
    _, ref = auth_registry
    master, slave = pty.openpty()
    env = {**os.environ, "HOME": home, "DOCKER_CONFIG": ""}
    cmd = [daemons.PYCTR, "-a", pyctrd.address, "-n", "auth", "images", "pull", "--plain", "-u", USER, ref]
    # A new session: the pty is stdin, not a controlling terminal, as under a terminal emulator
    # that is not ours; pyctr must ask on stdin.
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        answered = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every copy of the slave is closed, pyctr is gone
                    break
                if not chunk:
                    break
                seen += chunk
            if not answered and b"Password:" in seen:
                os.write(master, PASSWORD.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    text = seen.decode(errors="replace")
    assert answered, text
    assert rc == 0, text
    assert ref in image_names(pyctrd, home)
    assert_no_secret(pyctrd, text)  # not echoed


def test_user_without_password_and_no_terminal(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], home: str
) -> None:
    _, ref = auth_registry
    r = pyctr(pyctrd, home, "images", "pull", "--plain", "--user", USER, ref)  # stdin: /dev/null
    assert r.returncode != 0
    assert "no password given" in r.stderr and "not a terminal" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------- push


def test_push_with_user(
    pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str], built_images: images.Images, home: str
) -> None:
    reg, _ = auth_registry
    bb = built_images.busybox
    r = pyctr(pyctrd, home, "images", "import", "--no-unpack", "--base-name", bb.base_name, bb.oci_tar)
    assert r.returncode == 0, r.stderr
    dest = reg.ref("pushed/busybox", "v1")
    anonymous = pyctr(pyctrd, home, "images", "push", "--plain", dest, bb.name)
    assert anonymous.returncode != 0 and anonymous.stderr.startswith("pyctr: unauthorized:"), anonymous.stderr
    r = pyctr(pyctrd, home, "images", "push", "--plain", "--user", f"{USER}:{PASSWORD}", dest, bb.name)
    assert r.returncode == 0, r.stderr
    assert_no_secret(pyctrd, r.stdout, r.stderr)
    # What arrived is the image: skopeo reads it back with the same credentials.
    raw = daemons.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"--creds={USER}:{PASSWORD}", f"docker://{dest}"]
    )
    assert raw.returncode == 0, raw.stderr
    inspect = json.loads(pyctr(pyctrd, home, "images", "inspect", bb.name).stdout)
    assert json.loads(raw.stdout) == inspect["manifest"]


# ------------------------------------------------------------------ the auth stream, by hand


def test_auth_stream_answered_by_hand(pyctrd: daemons.Daemon, auth_registry: tuple[Registry, str]) -> None:
    """What a frontend in another language does: open the auth stream, name it in the
    RegistryResolver, answer each AuthRequest. HEADER (a ready Authorization value) pulls; NONE
    is "unauthorized"; the question names the registry host and the reference."""
    from pyctr.api import typeurl
    from pyctr.api._pb.containerd.services.transfer.v1 import TransferRequest
    from pyctr.api._pb.containerd.types import transfer as tt
    from pyctr.api._pb.google.protobuf import Any as PbAny
    from pyctr.ctr.client import Client, translate
    from pyctr.ctr.imageops import SideStream

    reg, ref = auth_registry

    def pack(msg: object) -> PbAny:
        url, value = typeurl.marshal(msg)  # type: ignore[arg-type]
        return PbAny(type_url=url, value=value)

    async def pull(answer: tt.AuthResponse) -> tuple[list[tt.AuthRequest], BaseException | None]:
        client = Client(pyctrd.address, "byhand")
        asked: list[tt.AuthRequest] = []
        try:
            auth = await SideStream(client, "auth").open()

            async def serve() -> None:
                while (obj := await auth.incoming.get()) is not None:
                    if isinstance(obj, tt.AuthRequest):
                        asked.append(obj)
                        auth.send(answer)

            server = asyncio.ensure_future(serve())
            error: BaseException | None = None
            try:
                resolver = tt.RegistryResolver(auth_stream=auth.id)
                await client.transfer.transfer(
                    TransferRequest(
                        source=pack(tt.OciRegistry(reference=ref, resolver=resolver)),
                        destination=pack(tt.ImageStore()),
                    )
                )
            except Exception as e:
                error = translate(e, pyctrd.address)
            await asyncio.wait_for(server, 10)  # the daemon closes the auth stream at the end
            await auth.close()
            return asked, error
        finally:
            client.close()

    header = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    asked, error = asyncio.run(pull(tt.AuthResponse(auth_type=tt.AuthType.HEADER, secret=header)))
    assert error is None, error
    assert [(a.host, a.reference) for a in asked] == [(reg.host, ref)]  # asked once, remembered
    asked, error = asyncio.run(pull(tt.AuthResponse(auth_type=tt.AuthType.NONE)))
    assert error is not None and str(error).startswith("unauthorized:"), error
    assert [a.host for a in asked] == [reg.host]
    assert_no_secret(pyctrd)
