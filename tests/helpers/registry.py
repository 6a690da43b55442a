"""A private Docker registry on 127.0.0.1 for pull tests: Debian's ``docker-registry``.

Storage lives in a temp dir; the port is a free one; the process is stopped by the PID we
started. Images go in with ``skopeo copy`` from an OCI layout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

CONFIG = """version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    base: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def push(
        self, layout: str, repo: str, tag: str = "latest", src_tag: str = "latest", creds: str = ""
    ) -> str:
        """Copy ``<layout>:<src_tag>`` to ``<repo>:<tag>`` (as ``creds``, ``user:password``, when
        given); returns the reference to pull."""
        auth = [f"--dest-creds={creds}"] if creds else []
        res = subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                *auth,
                f"oci:{layout}:{src_tag}",
                f"docker://{self.ref(repo, tag)}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise RuntimeError(f"skopeo push of {layout} failed: {res.stderr.strip()}")
        return self.ref(repo, tag)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.base, ignore_errors=True)


def _answers(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(timeout: float = 15.0) -> Registry:
    return _start("registry-", "", _answers, timeout)


def _start(
    prefix: str,
    extra_config: str,
    ready: Callable[[int], bool],
    timeout: float,
    files: dict[str, str] | None = None,
) -> Registry:
    """docker-registry on a free 127.0.0.1 port with ``extra_config`` appended to its config and
    ``files`` written into its directory (``{base}`` in ``extra_config``); ``ready(port)`` tells
    when it serves."""
    exe = shutil.which("docker-registry")
    if exe is None:
        raise FileNotFoundError("docker-registry is not installed")
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    for name, text in (files or {}).items():
        with open(os.path.join(base, name), "w") as f:
            f.write(text)
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        cfg = os.path.join(base, "config.yml")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(storage=os.path.join(base, "storage"), port=port))
            f.write(extra_config.replace("{base}", base))
        log_path = os.path.join(base, "registry.log")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                [exe, "serve", cfg], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        reg = Registry(base, port, proc, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ready(port):
                return reg
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    text = reg.log()
    shutil.rmtree(base, ignore_errors=True)
    raise RuntimeError(f"docker-registry did not come up:\n{text}")


# ------------------------------------------------------------------- a registry with basic auth

AUTH_CONFIG = """auth:
  htpasswd:
    realm: pyctr-test
    path: {htpasswd}
"""


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (the registry accepts nothing else): ``htpasswd``, else libcrypt."""
    if shutil.which("htpasswd"):
        out = subprocess.run(
            ["htpasswd", "-nbB", "-C", "4", user, password], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated, gone in 3.13; bcrypt through libxcrypt

    return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"


def _serves(port: int) -> bool:
    """Any HTTP answer on /v2/ (401 included: the registry is up and asks for credentials)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/v2/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def start_with_htpasswd(user: str, password: str, timeout: float = 15.0) -> Registry:
    """docker-registry on 127.0.0.1 that wants ``user``/``password`` (Basic) for everything."""
    config = AUTH_CONFIG.format(htpasswd="{base}/htpasswd")
    files = {"htpasswd": htpasswd_line(user, password) + "\n"}
    return _start("registry-auth-", config, _serves, timeout, files)


def push_with_credentials(
    reg: Registry, layout: str, repo: str, user: str, password: str, tag: str = "latest"
) -> str:
    """``Registry.push`` for a registry that wants credentials; returns the reference."""
    return reg.push(layout, repo, tag, creds=f"{user}:{password}")
