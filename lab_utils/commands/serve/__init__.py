"""``genlab serve``: every family draws a typed prompt, side by side, in a web page and a JSON API.

    genlab serve                                   # the shipped models on http://127.0.0.1:8000
    genlab serve port=8001 models=[ddpm,ldm]       # some of them
    genlab serve runs=runs/shapes                  # the zoo and every run folder under runs/shapes

The app is FastAPI on uvicorn (``lab_utils.commands.serve.app``); what it serves and its limits are
``lab_utils.commands.serve.models``; the bodies it answers with, which the OpenAPI document is built from, are
``schemas``; which Host headers it answers and how long it waits on a client are ``connections``; the page is plain
HTML, CSS and JavaScript in ``static/`` (no build step).
"""

from __future__ import annotations

import errno
import logging
import socket

import uvicorn
from omegaconf import DictConfig

from lab_utils.core.schema import typed_section

from .app import ServeError, create_app, request_model
from .connections import check_hosts, server_config
from .models import Connections, Limits, ServeConfig, ServedModel, load_models

__all__ = ["Connections", "Limits", "ServeConfig", "ServeError", "ServedModel", "check_hosts", "create_app",
           "load_models", "request_model", "serve_command_main", "server_config"]

log = logging.getLogger("genlab")


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken (or a host that is not this machine's) before loading any model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another server?): pass port=<another>") from None
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}); pass host=127.0.0.1 or "
                             "another port") from None


def check_names(config: ServeConfig) -> None:
    """Every model named is in the zoo, and ``runs`` is a folder (before the port is taken or anything loads)."""
    from pathlib import Path

    from lab_utils.harness.checkpoint import CheckpointError
    from lab_utils.harness.zoo import entries

    available = [name for name, entry in entries().items() if entry.generative]
    unknown = [name for name in config.models if name not in available]
    if unknown:
        raise CheckpointError(f"models: no pretrained model {unknown[0]!r}; the zoo has {', '.join(available) or 'none'} "
                              "(`genlab pretrained` lists them; runs=<folder> serves your own runs)")
    if config.runs and not Path(config.runs).expanduser().is_dir():
        raise CheckpointError(f"runs={config.runs}: no such folder (give a folder that holds run folders)")


def serve_command_main(cfg: DictConfig) -> None:
    import torch

    from lab_utils.harness.devices import pick_device

    config: ServeConfig = typed_section(cfg, ServeConfig, "serve")
    if config.limits.n > config.batch_size:
        raise ValueError(f"limits.n={config.limits.n} exceeds batch_size={config.batch_size}: one request is one batch")
    check_names(config)
    check_port(config.host, config.port)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    models = load_models(config, device)
    app = create_app(config, models)
    where = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}"
    print(f"genlab serve: {where}/ ({', '.join(models)}; API docs at {where}/docs); Ctrl-C stops it", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the server", config.host)
    uvicorn.Server(server_config(config, app)).run()
