"""The HTTP side: an ASGI app (Starlette) over a Scheduler.

    GET  /health                 {"status": "ok", "slots": n, "busy": k}
    GET  /v1/models              the one model served
    POST /v1/completions         OpenAI completions, streamed (Server-Sent Events) or whole
    POST /v1/chat/completions    the same with the model's chat template

Errors are OpenAI-style JSON bodies ({"error": {...}}) with a 4xx status for
the client's mistakes (protocol.ApiError) and 500 for a failed step. With an
API key set, every request must carry it as `Authorization: Bearer KEY`.
"""
import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import QinferError
from . import protocol
from .protocol import ApiError
from .scheduler import Job

MAX_BODY_BYTES = 16 << 20      # a request body beyond this is refused (413) before it is read whole


def _error(exc):
    return JSONResponse(exc.body(), status_code=exc.status)


class _ApiKey:
    """Pure ASGI middleware: requests without `Authorization: Bearer <key>` get a 401."""

    def __init__(self, app, key):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                response = _error(ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                           kind="authentication_error", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Relay:
    """Hands events from the scheduler's thread to the requests waiting on the event loop.

    A turn of the scheduler emits a token for each of its streams in a burst;
    the loop is woken once for the burst (send), not once per token: each
    wake-up (call_soon_threadsafe) is a write to a pipe and a system call on
    the loop's side, CPU time taken from the forward pass's threads on a
    machine whose cores they all use. The scheduler sends a turn's burst just
    before the forward step: woken at the first token instead, the loop took
    the GIL from the scheduler's sampling of the other streams (8 streams:
    0.8 ms a turn instead of 0.2).

    And the loop is woken at most once every `interval` seconds (--stream-interval),
    each stream then writing the tokens since the last wake-up in one write:
    every write costs the loop ~70 us of CPU (Starlette, h11, the socket; less on
    uvloop and httptools, docs/server.md), and at
    8 streams one a token took ~0.8 ms of a core a decode step of ~8 ms from the
    forward pass (docs/server.md). A request's first event and its last (done or
    error) go out at once: time to first token and latency are not delayed."""

    def __init__(self, loop, interval=0.0, clock=time.monotonic):
        self.loop, self.interval, self.clock = loop, interval, clock
        self.lock = threading.Lock()
        self.ready = set()          # inboxes with new events since the last wake-up
        self.urgent = False         # one of them holds a first or last event
        self.scheduled = False      # a wake-up is on its way
        self.last = -float("inf")   # clock() at the last wake-up sent

    def notify(self, inbox, urgent):   # any thread: the event goes out with the next send()
        with self.lock:
            self.ready.add(inbox)
            self.urgent |= urgent

    def send(self):                 # any thread
        now = self.clock()
        with self.lock:
            if not self.ready or self.scheduled or (not self.urgent and now - self.last < self.interval):
                return
            self.scheduled, self.urgent, self.last = True, False, now
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self):                # the loop
        with self.lock:
            ready, self.ready, self.scheduled = self.ready, set(), False
        for inbox in ready:
            inbox.event.set()


class _Inbox:
    """One request's events: put from the scheduler's thread, taken on the loop."""

    def __init__(self, relay):
        self.relay = relay
        self.items = collections.deque()
        self.event = asyncio.Event()
        self.started = False        # an event has been put

    def put(self, kind, value):
        self.items.append((kind, value))
        self.relay.notify(self, urgent=kind != "text" or not self.started)
        self.started = True

    async def take(self):
        """Every event so far, waiting for one if there is none."""
        while not self.items:
            self.event.clear()      # a put after this point wakes it through the relay
            await self.event.wait()
        return [self.items.popleft() for _ in range(len(self.items))]


class Server:
    """The routes of one served model. engine: a qinfer.Engine; scheduler: its Scheduler."""

    def __init__(self, engine, scheduler, model_name, stream_interval=0.0):
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.stream_interval = stream_interval
        self.created = int(time.time())
        self.relay = None           # made on the event loop's first request
        scheduler.send_events = self._send_events

    def _send_events(self):         # the scheduler's thread
        if self.relay is not None:
            self.relay.send()

    # ------------------------------------------------------------------ routes
    async def health(self, request):
        return JSONResponse({"status": "ok", "slots": len(self.scheduler.slots),
                             "busy": self.scheduler.busy_slots()})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "qinfer"}]})

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    # ----------------------------------------------------------------- helpers
    def _prompt_ids(self, req):
        engine = self.engine
        try:
            if req.kind == "chat":
                if not engine.chat_template:
                    raise ApiError(400, "this model has no chat template; use /v1/completions")
                ids = engine.chat_prompt_ids(req.messages)
            else:
                ids = engine.tokenizer.encode(req.prompt, add_bos=engine.tokenizer.add_bos_default)
        except QinferError as exc:
            if isinstance(exc, ApiError):
                raise
            raise ApiError(400, str(exc)) from None
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
        ctx = self.scheduler.ctx
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {ctx}",
                           param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
        return ids

    async def _generate(self, request, kind):
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
            req = protocol.parse(kind, body, self.model_name)
            ids = self._prompt_ids(req)
        except ApiError as exc:
            return _error(exc)
        if self.relay is None:
            self.relay = _Relay(asyncio.get_running_loop(), self.stream_interval)
        events = _Inbox(self.relay)
        greedy = req.temperature == 0 or req.top_p == 0
        job = Job(ids, events.put, req.max_tokens, temperature=0.0 if greedy else req.temperature,
                  top_p=1.0 if greedy else req.top_p, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos)
        response = protocol.Response(req, self.model_name)
        self.scheduler.submit(job)
        if req.stream:
            return StreamingResponse(self._stream(job, events, response, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = [req.prompt] if req.echo else []
        try:
            while True:
                for what, value in await events.take():
                    if what == "text":
                        pieces.append(value)
                    elif what == "done":
                        return JSONResponse(response.whole("".join(pieces), value))
                    else:
                        return _error(ApiError(500, f"generation failed: {value}", kind="server_error"))
        finally:
            job.cancel()            # a client gone mid-way frees its slot (no-op when done)

    async def _stream(self, job, events, response, req):
        sse = protocol.event
        try:
            if req.kind == "chat":
                yield sse(response.chunk(first=True))
            elif req.echo:
                yield sse(response.chunk(req.prompt))
            ended = False
            while not ended:
                out = []            # the events of one wake-up, sent in one write: one chunk a token
                for what, value in await events.take():
                    if what == "text":
                        out.append(response.text_event(value))
                    elif what == "done":
                        out.append(sse(response.chunk(finish=value.stop_reason)))
                        if req.include_usage:
                            out.append(sse(response.usage_chunk(value)))
                        ended = True
                        break
                    else:
                        out.append(sse(ApiError(500, f"generation failed: {value}", kind="server_error").body()))
                        ended = True
                        break
                yield "".join(out)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()


def create_app(engine, scheduler, model_name, api_key=None, stream_interval=0.0):
    """The ASGI app serving `engine` through `scheduler` under the name `model_name`; streams
    write at most every `stream_interval` seconds (_Relay)."""
    server = Server(engine, scheduler, model_name, stream_interval)
    routes = [Route("/health", server.health), Route("/v1/models", server.models),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]

    async def not_found(request, exc):
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                               code="not_found" if exc.status_code == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    middleware = [Middleware(_ApiKey, key=api_key)] if api_key else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: not_found},
                    lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.server = server
    return app
