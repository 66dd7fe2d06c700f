"""`qinfer serve`: an OpenAI-compatible HTTP server (needs the `server` extra: starlette, uvicorn).

    scheduler.py  slots (a KV cache each) and the loop that runs many generations
    protocol.py   the API's requests (checked) and responses
    app.py        the ASGI app: routes, streaming, errors, the API key
"""
from ..errors import QinferError


class ServerUnavailable(QinferError):
    """The optional server dependencies are not installed."""


def require():
    """Import the ASGI stack, or say how to install it."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ServerUnavailable(f"qinfer serve needs the server extra ({exc.name} is missing): "
                                "pip install 'qinfer[server]'") from None


DEFAULT_STREAM_INTERVAL = 0.02   # seconds: streams write at most 50 times a second (app._Relay)


def build(engine, parallel=1, ctx=None, model_name=None, api_key=None, stream_interval=DEFAULT_STREAM_INTERVAL):
    """(ASGI app, Scheduler) serving `engine` in `parallel` slots of `ctx` tokens each
    (default: the engine's context); a stream writes its new tokens at most every
    `stream_interval` seconds (0: each as it comes)."""
    require()
    import os

    from .app import create_app
    from .scheduler import Scheduler
    scheduler = Scheduler(engine, parallel=parallel, ctx=ctx)
    name = model_name or os.path.basename(os.path.normpath(engine.model_path))
    return create_app(engine, scheduler, name, api_key=api_key, stream_interval=stream_interval), scheduler
