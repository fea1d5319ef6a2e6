"""`omnistream serve --model DIR|demo [--host] [--port] [--api-key] [limits] [engine options]`.

Builds the engine, the app (`omnistream.server.app.build_app`) and runs it under uvicorn on a
socket bound here, so the startup line can say where it listens even for `--port 0`. One
process serves one device (`--device cuda:N`). Ctrl-C stops uvicorn (connections are given
--shutdown-timeout-s to finish), then the engine is closed; the process exits 130 with
`interrupted`, no traceback; SIGTERM (docker stop, systemd) stops it the same way and exits
143 with `terminated`.

`--model-config 3b|7b|tiny` serves a random-weight model of that architecture built directly on
the device (no checkpoint: load tests, `omnistream bench serve`), seeded by --weights-seed.

The engine core runs in its own process by default (--engine-process; engine/core_process.py):
HTTP parsing, JSON, media decoding and SSE then never hold the interpreter lock the engine loop
needs to launch its steps. --no-engine-process keeps it in a thread of the server's process.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal

from omnistream.entrypoints import options
from omnistream.entrypoints.serving import (  # noqa: F401 - STARTUP_PREFIX, parse_startup_line: re-exported (the tests)
    ACCESS_LOGGER,
    SERVER_ENGINE_DEFAULTS,
    SERVER_SAMPLING,
    SERVER_SAMPLING_SHOWN,
    STARTUP_PREFIX,
    UVICORN_LOG_LEVELS,
    bind_socket,
    build_engine,
    parse_startup_line,
    serve,
    server_sampling,
    startup_line,
    url_of,
)
from omnistream.errors import ConfigError, Terminated

def _stop_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd) stops the server as Ctrl-C does: uvicorn shuts down
    gracefully (open requests get --shutdown-timeout-s), then re-raises the signal here, which
    becomes Terminated (a KeyboardInterrupt): sessions and the engine are closed, `terminated`,
    exit 143. (The default action would kill the process after uvicorn's shutdown, skipping that.)"""
    def stop(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, stop)


def cmd_serve(args) -> int:
    _stop_on_sigterm()
    if getattr(args, "replicas", None) is not None:  # N engine replicas under Ray Serve (omnistream/cluster/launch.py)
        from omnistream.cluster.launch import serve_replicas

        return serve_replicas(args)
    from omnistream.server.app import build_app

    from omnistream.entrypoints.engine_args import engine_args

    # every flag is checked before the port is taken and a model is loaded
    if args.model is None and args.model_config is None:
        raise ConfigError("give --model DIR (a checkpoint directory) or --model demo (or --model-config for a random-weight architecture)")
    config = options.server_config(args)
    if args.model_config and config.served_model_name is None:  # its folder is a throwaway tokenizer's
        config = dataclasses.replace(config, served_model_name=f"random-{args.model_config}")
    default_sampling = server_sampling(args)
    device, dtype, engine_options = engine_args(args)
    engine_options = SERVER_ENGINE_DEFAULTS | engine_options
    logging.getLogger("omnistream").setLevel(getattr(logging, args.log_level.upper()))
    if args.access_log:  # one line per request with its id (server/ops.py), whatever the level
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    sock = bind_socket(config.host, config.port)
    try:
        with build_engine(args, device, dtype, engine_options) as engine:
            app = build_app(engine, config)
            if default_sampling is not None:  # for the fields a request leaves out
                app.state.omni.default_sampling = default_sampling
            app.state.omni.default_max_tokens = options.sampling_kwargs(args).get("max_new_tokens")
            source = f"built as a random {args.model_config} architecture" if args.model_config else None
            print(startup_line(url_of(sock), app.state.omni.model_name, engine, source, len(config.api_keys())), flush=True)
            serve(app, sock, args.log_level, args.shutdown_timeout_s)
    finally:
        sock.close()
    return 0


def add_serve_command(sub, add_run_args) -> None:
    from omnistream.models.qwen2_5_vl_presets import PRESETS

    p = sub.add_parser("serve", help="serve the engine over HTTP: OpenAI chat completions, sessions, live WebSocket, web page",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", choices=sorted(PRESETS), default=None,
                   help="serve a random-weight model of this architecture built on the device (wins over --model)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of --model-config's random weights (default: 0)")
    p.add_argument("--log-level", choices=UVICORN_LOG_LEVELS, default="warning",
                   help="log level of the engine, the server and uvicorn (default: warning)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr: id, method, path, status, ms (default: on)")
    p.add_argument("--shutdown-timeout-s", type=options.at_least(float, 0, strict=True), default=5.0,
                   help="on Ctrl-C, seconds open requests get to finish before they are cut (default: 5)")
    options.add_server_args(p)
    from omnistream.cluster.launch import add_cluster_args

    add_cluster_args(p)
    add_run_args(p, model_default=None, sampling_title="default sampling (for the fields a request leaves out)",
                 sampling_shown={**{k: str(v) for k, v in SERVER_SAMPLING.items()}, **SERVER_SAMPLING_SHOWN},
                 engine_shown={"engine_process": "on for serve"})
    p.set_defaults(func=cmd_serve)
