"""How a server process starts, for `omnistream serve` (entrypoints/serve_cli.py) and each engine
replica of a cluster (cluster/launch.py, cluster/replica.py): the socket bound before the model
loads (so the startup line can say where it listens even for --port 0), the startup line, the
engine built from the flags (or a random-weight architecture on the device), uvicorn run on
that socket with our shutdown, and the server's defaults (sampling, engine options).
"""

from __future__ import annotations

import signal
import socket
import time

from omnistream.entrypoints import options
from omnistream.errors import ConfigError, Terminated

STARTUP_PREFIX = "omnistream serve: listening on "  # bench serve and the tests read this line
SHUTDOWN_CLOSE_WAIT_S = 5.0  # for live sockets to say session_expired and close at a stop signal
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ACCESS_LOGGER = "omnistream.server.access"


def startup_line(url: str, model_name: str, engine, source: str | None = None, api_keys: int = 0) -> str:
    """The one line printed once the socket is bound: where, which model (from where), on what,
    and whether a key is needed (an open server says so)."""
    weights = "; RANDOM weights: answers are meaningless text" if engine.random_weights else ""
    where = source or f"from {engine.model_dir}"
    dtype = str(engine.cfg.torch_dtype).replace("torch.", "")
    auth = f"; {api_keys} API key{'s' if api_keys > 1 else ''}" if api_keys else "; no API key: open to whoever reaches it"
    return f"{STARTUP_PREFIX}{url} (model {model_name!r} {where}; {engine.cfg.device} {dtype}{weights}{auth}; {http_stack()})"


def http_stack() -> str:
    """The event loop and HTTP parser uvicorn picks (its "auto": uvloop and httptools when they
    are installed, else asyncio and h11: several times slower per request), so that a report
    made on another machine says which pair served it."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn on {loop} + {parser}"


def parse_startup_line(line: str) -> str | None:
    """The URL of a startup line, or None if `line` is not one."""
    if not line.startswith(STARTUP_PREFIX):
        return None
    return line[len(STARTUP_PREFIX):].split(" ", 1)[0]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. IPv4 or IPv6 by host."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def build_engine(args, device: str, dtype: str, engine_options: dict):
    """The engine of --model or --model-config."""
    from omnistream.entrypoints.engine_args import load_engine

    if args.model_config:
        from omnistream.bench.models import make_engine
        from omnistream.entrypoints.engine_args import without_random_weights_warning
        from omnistream.entrypoints.progress import Progress

        with without_random_weights_warning(), Progress(f"building a random {args.model_config} model"):
            return make_engine(args.model_config, device, dtype, args.weights_seed, **engine_options)
    return load_engine(args.model, device, dtype, notice=False, **engine_options)  # the startup line announces it


def serve(app, sock: socket.socket, log_level: str, shutdown_timeout_s: float) -> None:
    """Runs uvicorn on `sock` until a signal stops it, then raises that stop: uvicorn re-raises
    the signal itself (KeyboardInterrupt for SIGINT, Terminated for SIGTERM, see
    _stop_on_sigterm), except where its handler is SIG_IGN: a shell's background job ignores
    SIGINT, and the server then returned as if nothing had happened, exit 0 and no word."""
    import uvicorn

    # log_config None: logging stays as the CLI set it (one format); uvicorn's access log is
    # off, the server writes its own line per request with the request id
    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout_s)
    server = _ending_server_class()(config)
    server.run(sockets=[sock])
    if server.stop_signal == signal.SIGTERM:
        raise Terminated
    if server.stop_signal is not None:
        raise KeyboardInterrupt


def _ending_server_class():
    import uvicorn

    class EndingServer(uvicorn.Server):
        """At the stop signal, answers in flight are told to end (ServerState.begin_shutdown),
        on the event loop: their streams close cleanly with a `server_shutting_down` event and
        [DONE] instead of being cancelled at the end of the graceful period (a traceback in the
        log, a broken chunked response for the client)."""

        stop_signal: int | None = None  # the signal that stopped it

        def handle_exit(self, sig, frame) -> None:
            self.stop_signal = self.stop_signal or sig
            state = getattr(getattr(self.config.app, "state", None), "omni", None)
            loop = getattr(self, "_omni_loop", None)
            if state is not None and loop is not None:
                loop.call_soon_threadsafe(state.begin_shutdown)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            import asyncio

            self._omni_loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        async def shutdown(self, sockets=None) -> None:
            """Before uvicorn closes the connections (a live socket would get 1012 and no
            event), what begin_shutdown started ends: live sockets say session_expired and
            close with 1001."""
            import asyncio

            state = getattr(getattr(self.config.app, "state", None), "omni", None)
            if state is not None and not state.shutting_down:  # the signal's callback has not run yet
                state.begin_shutdown()
            await asyncio.sleep(0)  # callbacks queued by other threads' begin_shutdown run first
            tasks = list(getattr(state, "shutdown_tasks", ()))
            if tasks:
                await asyncio.wait(tasks, timeout=SHUTDOWN_CLOSE_WAIT_S)
            await super().shutdown(sockets=sockets)

    return EndingServer


class BackgroundServer:
    """uvicorn serving `app` in a daemon thread on a loopback socket (tests, the soak tool):

        with BackgroundServer(build_app(engine, config)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", start_timeout_s: float = 30.0) -> None:
        import threading

        import uvicorn

        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)  # not the main thread: uvicorn installs no signal handlers
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# the server's own defaults where no flag is given: OpenAI's temperature 1; the answer's
# length is the request's max_tokens, else what the context leaves (server/chat.py)
SERVER_SAMPLING = {"temperature": 1.0}
SERVER_SAMPLING_SHOWN = {"max_new_tokens": "the request's max_tokens, else 4096 (server/common.DEFAULT_MAX_TOKENS), "
                                          "capped by the room left in the context"}
# the engine options serve sets where no flag is given (the Python API's default stays off)
SERVER_ENGINE_DEFAULTS = {"engine_process": True}


def server_sampling(args):
    """The sampling flags given -> the server's SamplingParams for the fields a request leaves
    out, or None (none given: the routes' own defaults)."""
    given = options.sampling_kwargs(args)
    if not given:
        return None
    from omnistream.engine.sampling import SamplingParams

    with options.flag_names(options.sampling_option_list()):
        return SamplingParams(**(SERVER_SAMPLING | given))
