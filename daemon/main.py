"""``pyctrd``: the daemon's entry point, with containerd's flags and ``config default``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Sequence

from pyctr.api.log import get_logger
from pyctr.api.version import REVISION, VERSION
from pyctr.daemon import config as cfgmod
from pyctr.daemon import logging as logmod

log = get_logger("pyctrd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyctrd",
        description="pyctrd: a container supervisor that serves containerd's API",
    )
    p.add_argument(
        "-c", "--config", help=f"path to the configuration file (default {cfgmod.DEFAULT_CONFIG_PATH})"
    )
    p.add_argument("-l", "--log-level", help="log level: trace, debug, info, warn, error, fatal, panic")
    p.add_argument("-a", "--address", help="address for pyctrd's gRPC server")
    p.add_argument("--root", help="pyctrd root directory")
    p.add_argument("--state", help="pyctrd state directory")
    p.add_argument("-v", "--version", action="store_true", help="print the version")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("config", help="information on the pyctrd config")
    csub = c.add_subparsers(dest="config_command", required=True)
    csub.add_parser("default", help="print the default configuration")
    csub.add_parser("dump", help="print the configuration after the file and flags are applied")
    return p


def load_config(args: argparse.Namespace) -> cfgmod.Config:
    path = args.config
    if path is None:
        path = cfgmod.DEFAULT_CONFIG_PATH if os.path.exists(cfgmod.DEFAULT_CONFIG_PATH) else None
    cfg = cfgmod.load(path) if path else cfgmod.Config()
    if args.root:
        cfg.root = args.root
    if args.state:
        cfg.state = args.state
    if args.address:
        cfg.grpc.address = args.address
    if args.log_level:
        cfg.debug.level = args.log_level
    for what in ("root", "state"):
        value = getattr(cfg, what)
        if not os.path.isabs(value):
            raise cfgmod.ConfigError(f"{what} path {value!r} must be absolute")
    if cfg.root == cfg.state:
        raise cfgmod.ConfigError("root and state must be different paths")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    # No cyclic collection while start-up loads the daemon's modules and plugins: ~70 young
    # generation passes over objects that all stay alive, ~6 % of start-up CPU. Once the daemon
    # serves, those objects go to the permanent generation (gc.freeze) and collection resumes;
    # later full collections then never walk them again.
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    started = time.monotonic()
    args = _parser().parse_args(argv)
    if args.version:
        print(f"pyctrd {VERSION} {REVISION}")
        return 0
    try:
        if args.command == "config":
            from pyctr.daemon.builtins import plugin_defaults

            if args.config_command == "default":
                print(cfgmod.to_toml(cfgmod.Config(), plugin_defaults()), end="")
            else:
                print(cfgmod.to_toml(load_config(args), plugin_defaults()), end="")
            return 0
        cfg = load_config(args)
        logmod.configure(cfg.debug.level, cfg.debug.format)
    except (cfgmod.ConfigError, ValueError, OSError) as exc:
        print(f"pyctrd: {exc}", file=sys.stderr)
        return 1

    import uvloop

    from pyctr.daemon.daemon import Daemon, StartError

    async def serve() -> int:
        daemon = Daemon(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await daemon.start()
        except StartError as exc:
            log.error("pyctrd failed to start", error=str(exc))
            await daemon.stop()
            return 1
        # Start-up left a few hundred garbage objects (tens of KiB); they are frozen with the rest
        # rather than paying a full collection before the first request.
        gc.freeze()
        gc.enable()
        log.info(
            "pyctrd successfully booted",
            address=cfg.grpc.address,
            version=VERSION,
            seconds=round(time.monotonic() - started, 3),
        )
        await stop.wait()
        log.info("stopping pyctrd")
        await daemon.stop()
        return 0

    return uvloop.run(serve())


if __name__ == "__main__":
    sys.exit(main())
