"""`qinfer serve`: the OpenAI-compatible HTTP server (qinfer/server/) on one model."""
import ipaddress
import socket
import sys

from ..errors import QinferError
from .options import add_model_options, kv_cache_args, non_negative_int, positive_int

DEFAULT_SLOT_CTX = 4096      # tokens a slot holds unless --ctx says; at most the trained context


def add_parser(sub):
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve GET /v1/models, POST /v1/completions, POST /v1/chat/completions "
                                   "(streamed or whole) and GET /health. Up to --parallel requests run at "
                                   "once, each in a slot with a KV cache of its own (--ctx tokens); a "
                                   "request whose prompt starts with what a slot holds (a chat's next "
                                   "turn) prefills only the rest. Needs the server extra: "
                                   "pip install 'qinfer[server]'.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens the "
                        "server to the network, best with --api-key)")
    p.add_argument("--port", type=positive_int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--parallel", type=positive_int, default=4, metavar="N",
                   help="requests served at once, one KV-cache slot each (default 4)")
    p.add_argument("--activations", choices=("float", "int8"), default=None,
                   help="int8 (the server's default): activations rounded to int8 per block of 32 inputs, as "
                        "`qinfer generate --activations int8` and as llama.cpp computes; a decode step of "
                        "several streams then runs the int8 row kernels, and the throughput grows with the "
                        "streams. float: generate's default numbers, but a step of several streams is bound "
                        "by float multiply-adds (8 streams ~1.5x one). Default: QINFER_ACTIVATIONS if set, "
                        "else int8")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--stream-interval", type=non_negative_int, default=None, metavar="MS",
                   help="a streamed reply writes its new tokens at most every MS milliseconds (default "
                        "20; 0: each token as it comes): each write costs the server CPU time that a "
                        "busy server's decode steps then lack; a reply's first and last chunks go out "
                        "at once")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in the API (default: the model file or directory's name)")
    return p


def _check_listen(host, port):
    """Fail now, in one line, where uvicorn would fail later with a log."""
    if port > 65535:
        raise QinferError(f"--port {port} is not a TCP port (1..65535)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, UnicodeError) as exc:
        raise QinferError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None


def serve_activations(given):
    """--activations, else QINFER_ACTIVATIONS, else int8: a server decodes several streams in one
    step, and only int8 activations let that step's cost grow slower than its rows (a float
    step of 8 rows widens every weight to float for each row: bound by multiply-adds)."""
    from .. import kernels
    return given or kernels.environment_activations() or "int8"


def _loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args):
    from .. import server
    from ..engine import Engine, warn_beyond_training

    server.require()
    import uvicorn

    _check_listen(args.host, args.port)
    # The slots have a KV cache of their own (parallel x ctx tokens); the engine's own
    # would go unused, so it holds a single token.
    engine = Engine(args.model, threads=args.threads, ctx=1, quantize=args.quantize, group_size=args.group_size,
                    activations=serve_activations(args.activations), **kv_cache_args(args))
    ctx = args.ctx
    if ctx is None:
        ctx = min(engine.config.max_position_embeddings or DEFAULT_SLOT_CTX, DEFAULT_SLOT_CTX)
    warn_beyond_training(ctx, engine.config)
    interval = server.DEFAULT_STREAM_INTERVAL if args.stream_interval is None else args.stream_interval / 1000
    app, scheduler = server.build(engine, parallel=args.parallel, ctx=ctx, model_name=args.model_name,
                                  api_key=args.api_key, stream_interval=interval)
    name = app.state.server.model_name
    if not _loopback(args.host) and not args.api_key:
        print(f"qinfer: warning: listening on {args.host} without --api-key: anyone who reaches this "
              f"machine can use the server", file=sys.stderr)
    print(f"qinfer: serving {name} on http://{args.host}:{args.port}/v1 ({args.parallel} slots of {ctx} "
          f"tokens, {engine.model.threads} threads, {engine.model.activations} activations, loaded in "
          f"{engine.load_seconds:.1f} s); Ctrl-C stops", file=sys.stderr)
    try:
        # lifespan off: the scheduler is closed here, and Ctrl-C leaves no lifespan traceback
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="off")
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.close()
    print("qinfer: server stopped", file=sys.stderr)
