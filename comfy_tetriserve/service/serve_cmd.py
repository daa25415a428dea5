"""``comfy-tetriserve serve``: run the scheduler service (one per GPU box).

Flags come from ``ServiceConfig``; ``--config FILE`` reads the same settings from a JSON object
first (flags given on the command line win). Without ``--token`` the token comes from
``TETRISERVE_TOKEN``; listening beyond loopback without one is refused.

    comfy-tetriserve serve --devices sim:8 --model flux-dev=sim:flux --policy tetriserve
    comfy-tetriserve serve --devices cuda:0-7 --model-dir ~/ComfyUI/models/diffusion_models
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .. import config as config_module
from ..errors import TetriServeError
from .settings import ServiceConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="config_file", metavar="FILE",
                        help="JSON file with any of the settings below (flags override it)")
    config_module.add_arguments(parser, ServiceConfig)


def build_config(args: argparse.Namespace) -> ServiceConfig:
    cfg = config_module.from_args(ServiceConfig, args, getattr(args, "config_file", None))
    if cfg.token is None:
        token = config_module.env("TETRISERVE_TOKEN")
        if token:
            cfg = dataclasses.replace(cfg, token=token)
    return cfg


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .app import create_app

    try:
        cfg = build_config(args)
        app = create_app(cfg)
    except (TetriServeError, ValueError, OSError) as exc:
        print(f"comfy-tetriserve serve: {exc}", file=sys.stderr)
        return 2
    log.info("serving on http://%s:%d (devices %s, policy %s)", cfg.host, cfg.port, cfg.devices, cfg.policy_name)
    # The event loop shares the GIL with the threads that parse submits and run forecasts: with Python's
    # default 5 ms switch interval every wake of the loop could wait that long behind them, and at 50
    # submits/s the health route's p99 was 120-130 ms; at 0.5 ms it was 10-16 ms (docs/api.md).
    sys.setswitchinterval(cfg.gil_switch_ms / 1000)
    web.run_app(app, host=cfg.host, port=cfg.port, print=log.info, shutdown_timeout=cfg.shutdown_grace_s,
                access_log=None)
    return 0
