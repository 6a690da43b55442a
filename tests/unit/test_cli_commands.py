"""pyctr's command table: it must name exactly what each command module registers.

``pyctr`` imports only the module of the command it runs and lists the others from the table in
``ctr/main.py``; a table out of step with a module would show wrong help or refuse a valid name.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from pyctr.ctr import main


def _registered(module: str) -> list[tuple[str, list[str], str]]:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    importlib.import_module(f"pyctr.ctr.commands.{module}").register(sub)
    out = []
    for action in sub._choices_actions:
        name = action.dest
        aliases = [n for n, parser in sub.choices.items() if parser is sub.choices[name] and n != name]
        out.append((name, aliases, action.help or ""))
    return out


@pytest.mark.parametrize("module", [m for m, _ in main.COMMANDS])
def test_table_matches_what_the_module_registers(module: str) -> None:
    assert dict(main.COMMANDS)[module] == _registered(module)


def test_only_the_command_run_is_imported() -> None:
    code = (
        "import sys\n"
        "from pyctr.ctr import main\n"
        "main.parser(['-n', 'x', 'version'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyctr.ctr.commands.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pyctr.ctr.commands.version']"


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["-n", "moby", "images", "ls"], "images"),
        (["--address", "/x", "--timeout", "3", "t", "ls"], "t"),
        (["-h"], ""),
        ([], ""),
    ],
)
def test_command_word_skips_global_options(argv: list[str], word: str) -> None:
    assert main._command_word(argv) == word
