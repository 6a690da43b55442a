"""pyctr's side of registry credentials: ``--user`` and Docker's config.json (pyctr.ctr.credentials).

The credential helper is a real program (a shell script speaking Docker's helper protocol) put
first on PATH.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from pyctr.api.errdefs import InvalidArgument
from pyctr.ctr.credentials import Credentials, CredentialSource, DockerConfig, parse_user


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config(tmp_path: Path, doc: object) -> DockerConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    loaded = DockerConfig.load(str(path))
    assert loaded is not None
    return loaded


def test_parse_user() -> None:
    assert parse_user("me:pw") == ("me", "pw")
    assert parse_user("me:p:w") == ("me", "p:w")  # the password may hold ':'
    assert parse_user("me") == ("me", None)
    assert parse_user("me:") == ("me", None)  # as ctr: an empty password is asked for
    with pytest.raises(InvalidArgument):
        parse_user(":pw")


def test_auths_spellings_and_kinds(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        {
            "auths": {
                "127.0.0.1:5000": {"auth": b64("a:pw-a")},
                "https://registry.example:8443/v1/": {"username": "b", "password": "pw-b"},
                "https://index.docker.io/v1/": {"auth": b64("hub:pw-hub")},
                "tokens.example": {"identitytoken": "refresh-tok"},
                "empty.example": {},
            }
        },
    )
    assert cfg.lookup("127.0.0.1:5000") == Credentials("a", "pw-a")
    assert cfg.lookup("registry.example:8443") == Credentials("b", "pw-b")
    for alias in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        assert cfg.lookup(alias) == Credentials("hub", "pw-hub")
    assert cfg.lookup("tokens.example") == Credentials("", "refresh-tok")
    assert cfg.lookup("empty.example") is None
    assert cfg.lookup("127.0.0.1:5001") is None  # another port is another registry
    assert "pw-a" not in repr(cfg.lookup("127.0.0.1:5000"))


def test_broken_files_and_entries(tmp_path: Path) -> None:
    assert DockerConfig.load(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidArgument, match="not JSON"):
        DockerConfig.load(str(tmp_path / "bad.json"))
    cfg = config(tmp_path, {"auths": {"h.example": {"auth": b64("no-colon")}}})
    with pytest.raises(InvalidArgument, match="no ':'") as exc:
        cfg.lookup("h.example")
    assert "no-colon" not in str(exc.value)


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-pyctrtest"
    # Answers for helper.example only, as Docker's helpers do ("not found" and exit 1 otherwise).
    helper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 2\n'
        "read server\n"
        'if [ "$server" = helper.example ]; then\n'
        '  echo \'{"ServerURL":"helper.example","Username":"h","Secret":"pw-h"}\'\n'
        'elif [ "$server" = https://index.docker.io/v1/ ]; then\n'
        '  echo \'{"ServerURL":"x","Username":"<token>","Secret":"tok"}\'\n'
        "else\n"
        "  echo 'credentials not found in native keychain'; exit 1\n"
        "fi\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = config(
        tmp_path,
        {
            "credHelpers": {"helper.example": "pyctrtest"},
            "credsStore": "pyctrtest",
            "auths": {"other.example": {"auth": b64("o:pw-o")}},
        },
    )
    assert cfg.lookup("helper.example") == Credentials("h", "pw-h")
    assert cfg.lookup("docker.io") == Credentials("", "tok")  # an identity token from the store
    assert cfg.lookup("other.example") == Credentials("o", "pw-o")  # the store has none: auths
    missing = config(tmp_path, {"credsStore": "nosuchhelper"})
    with pytest.raises(InvalidArgument, match="not installed"):
        missing.lookup("x.example")


def test_source_user_wins_and_no_prompt_without_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"h.example": {"auth": b64("c:pw-c")}}}))
    from_config = CredentialSource.from_args("")
    assert not from_config.empty and from_config.lookup("h.example") == Credentials("c", "pw-c")
    from_user = CredentialSource.from_args("u:pw-u")
    assert from_user.lookup("h.example") == from_user.lookup("any.example") == Credentials("u", "pw-u")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    assert CredentialSource.from_args("").empty
    with open(os.devnull) as devnull:
        monkeypatch.setattr("sys.stdin", devnull)
        with pytest.raises(InvalidArgument, match="not a terminal"):
            CredentialSource.from_args("u")
