"""pyctr.api.log: calls below the level cost nothing and load nothing; the rest reach structlog.

Each case runs in a fresh interpreter: structlog's configuration is process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_calls_below_the_level_neither_write_nor_load_structlog() -> None:
    r = run(
        "import sys\n"
        "from pyctr.daemon import logging\n"
        "from pyctr.api.log import get_logger\n"
        "logging.configure('warn', 'json')\n"
        "log = get_logger('t')\n"
        "log.debug('d'); log.info('i', k=1)\n"
        "print('structlog' in sys.modules)\n"
    )
    assert r.stdout.split() == ["False"]
    assert r.stderr == ""


def test_lines_at_the_level_are_json_with_level_event_and_fields() -> None:
    r = run(
        "from pyctr.daemon import logging\n"
        "from pyctr.api.log import get_logger\n"
        "logging.configure('info', 'json')\n"
        "log = get_logger('t')\n"
        "log.debug('hidden')\n"
        "log.info('shown', id='c1', n=2)\n"
        "log.warning('warned')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    log.exception('failed', id='c2')\n"
    )
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert [(x["event"], x["level"]) for x in lines] == [
        ("shown", "info"),
        ("warned", "warning"),
        ("failed", "error"),
    ]
    assert lines[0]["id"] == "c1" and lines[0]["n"] == 2 and lines[0]["timestamp"].endswith("Z")
    assert "ZeroDivisionError" in lines[2]["exception"]
    assert r.stdout == ""


def test_a_level_set_again_takes_effect_for_loggers_already_used() -> None:
    r = run(
        "from pyctr.daemon import logging\n"
        "from pyctr.api.log import get_logger\n"
        "log = get_logger('t')\n"
        "logging.configure('error', 'json')\n"
        "log.warning('dropped')\n"
        "log.error('first')\n"
        "logging.configure('debug', 'json')\n"
        "log.debug('second')\n"
    )
    assert [json.loads(line)["event"] for line in r.stderr.splitlines()] == ["first", "second"]


def test_without_configuration_lines_go_to_structlog_defaults() -> None:
    """Components built outside the daemon (tests, tools) log as structlog.get_logger would."""
    r = run("from pyctr.api.log import get_logger\nget_logger('t').debug('plain', k='v')\n")
    assert "plain" in r.stdout and "k=v" in r.stdout
