"""The import-layer check: nothing imports upward, and nobody imports a folder by its bare name.

    api                       the contract and leaf libraries
    shim, snapshotter         above api
    daemon, ctr               on top; ctr talks to the daemon only over the wire

Run by ``make test`` (``make layers``); exits non-zero listing every offending import.
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("api", "shim", "snapshotter", "daemon", "ctr")
ALLOWED: dict[str, set[str]] = {
    "api": {"api"},
    "shim": {"api", "shim"},
    "snapshotter": {"api", "snapshotter"},
    "daemon": {"api", "snapshotter", "shim", "daemon"},
    "ctr": {"api", "ctr"},
}


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")[: -node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
                out.append((node.lineno, base))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def check() -> list[str]:
    problems: list[str] = []
    for folder in FOLDERS:
        top = os.path.join(REPO, folder)
        for dirpath, _, files in os.walk(top):
            if "_pb" in dirpath.split(os.sep):
                continue  # generated code imports only itself and betterproto2
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, REPO)
                module = "pyctr." + rel[:-3].replace(os.sep, ".")
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for lineno, target in imported_modules(tree, module):
                    head = target.split(".")[0]
                    if head in FOLDERS:
                        problems.append(f"{rel}:{lineno}: imports {target!r}; use pyctr.{target}")
                        continue
                    parts = target.split(".")
                    if parts[0] != "pyctr" or len(parts) < 2:
                        continue
                    if parts[1] not in ALLOWED[folder]:
                        problems.append(
                            f"{rel}:{lineno}: {folder} may not import {target} (layer {parts[1]})"
                        )
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} import-layer violation(s)", file=sys.stderr)
        return 1
    print("import layers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
