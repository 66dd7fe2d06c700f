"""qinfer's OpenAI-compatible server, through the official `openai` client and raw HTTP.

A real uvicorn server on 127.0.0.1 (a free port) serves SmolLM2 in 8 slots; the
references are the Engine run directly on the same prompts (greedy), and the
tokenizer's own token counts."""
import concurrent.futures
import json
import socket
import threading
import time

import pytest

import llama_reference as ref

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import qinfer  # noqa: E402
from qinfer.server import build  # noqa: E402

SLOTS = 8
CTX = 512
KEY = "sk-test-key"
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "The three primary colors are",
           "import numpy as np\n", "Water boils at", "My favourite fruit is", "In 1969, the first"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    def __init__(self, engine, api_key=None, **options):
        self.app, self.scheduler = build(engine, parallel=SLOTS, ctx=CTX, model_name="smollm2", api_key=api_key,
                                         **options)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def engine():
    ref.smollm2_path()          # skips (or fails under CI) without the default model
    return qinfer.Engine(threads=2, ctx=CTX)


@pytest.fixture(scope="module")
def server(engine):
    running = _Running(engine)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alone(engine):
    """What the Engine itself generates for each prompt, greedy, 12 tokens: (text, stats)."""
    out = {}
    for p in PROMPTS:
        text = engine.generate(p, max_new_tokens=12)
        out[p] = (text, engine.last_stats)
    return out


def _busy(server):
    return httpx.get(server.url + "/health").json()["busy"]


def test_completion_matches_the_engine_and_counts_tokens(client, engine, alone):
    p = PROMPTS[0]
    r = client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0)
    text, stats = alone[p]
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(p, add_bos=engine.tokenizer.add_bos_default))
    assert r.usage.completion_tokens == stats.generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if stats.stop_reason == "length" else "stop")


def test_streamed_completion_is_the_same_text(client, alone):
    p = PROMPTS[1]
    chunks = list(client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == alone[p][0]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stream_interval_holds_text_but_not_a_first_or_last_event():
    """A stream's text waits up to the interval to go out with later text; its first event
    and its end (done, error) wake the event loop at once."""
    from qinfer.server.app import _Inbox, _Relay
    wakeups, now = [], [100.0]

    class Loop:
        def call_soon_threadsafe(self, fn):
            wakeups.append(fn)

    relay = _Relay(Loop(), interval=0.02, clock=lambda: now[0])
    inbox = _Inbox(relay)

    def sent():                 # the wake-ups send() asked for, run as the loop would
        count = len(wakeups)
        while wakeups:
            wakeups.pop()()
        return count

    relay.send()
    assert sent() == 0          # nothing to send
    inbox.put("text", "a")
    relay.send()
    assert sent() == 1          # a first event: at once
    inbox.put("text", "b")
    relay.send()
    now[0] += 0.015
    inbox.put("text", "c")
    relay.send()
    assert sent() == 0          # within the interval: held
    now[0] += 0.006
    relay.send()
    assert sent() == 1          # the interval is over: b and c go out together
    inbox.put("text", "d")
    relay.send()
    assert sent() == 0
    inbox.put("done", None)
    relay.send()
    assert sent() == 1          # the last event: at once, d with it
    assert [v for _, v in inbox.items] == ["a", "b", "c", "d", None]
    assert inbox.event.is_set()


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_text_event_is_the_chunk_as_json(kind):
    """Response.text_event (the chunk's JSON around the text made once) is exactly the
    Server-Sent Event of the whole chunk, json.dumps'd, whatever the text holds."""
    from qinfer.server import protocol
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else \
        {"model": "m", "prompt": "hi"}
    response = protocol.Response(protocol.parse(kind, body, "m"), "m")
    for text in ["a", ' "quoted" ', "back\\slash", "line\nbreak\ttab", "\0", "\u2028", "é😀", "}{]["]:
        got = response.text_event(text)
        assert got == f"data: {json.dumps(response.chunk(text), ensure_ascii=False)}\n\n"
        assert json.loads(got[len("data: "):])["choices"][0] == response.chunk(text)["choices"][0]


def test_a_long_stream_interval_delays_no_reply(engine, alone):
    """With an interval far longer than the request, the stream still ends as soon as the
    generation does (its last event is sent at once), with all its text."""
    running = _Running(engine, stream_interval=600.0)
    try:
        c = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        p = PROMPTS[2]
        start = time.monotonic()
        chunks = list(c.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0, stream=True))
        assert time.monotonic() - start < 120
        assert "".join(ch.choices[0].text for ch in chunks) == alone[p][0]
    finally:
        running.stop()


def test_chat_streamed_and_whole_agree_with_engine_chat(client, engine):
    messages = [{"role": "user", "content": "Name a colour."}]
    want = engine.chat(messages, max_new_tokens=10, reuse_cache=False)
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(engine.chat_prompt_ids(messages))
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_are_honoured(client, alone):
    p = PROMPTS[3]
    text = alone[p][0]
    cut = text.strip()[:3]
    assert cut, "the reference text is long enough to cut"
    r = client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0, stop=[cut])
    assert r.choices[0].text == text[:text.index(cut)]
    assert r.choices[0].finish_reason == "stop"


def test_ignore_eos_decodes_past_the_end_of_sequence(client, engine):
    # this prompt's greedy continuation is the end-of-sequence token at once
    p = "List the countries of Europe and describe each in a sentence. (request 2.0)"
    plain = client.completions.create(model="smollm2", prompt=p, max_tokens=20, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 20
    # the reference: greedy decoding in the test, the end-of-sequence ids' logits struck out
    model, tok = engine.model, engine.tokenizer
    eos = sorted(set(tok.eos_ids) | set(engine.config.eos_token_ids or ()))
    ids = tok.encode(p, add_bos=tok.add_bos_default)
    cache = model.new_cache(CTX)
    logits, want = model.forward(ids, 0, cache=cache), []
    for i in range(20):
        logits = logits.copy()
        logits[eos] = -float("inf")
        want.append(int(logits.argmax()))
        logits = model.forward([want[-1]], len(ids) + i, cache=cache)
    r = client.completions.create(model="smollm2", prompt=p, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode(want)


def test_a_chat_second_turn_reuses_the_cache(client):
    first = [{"role": "user", "content": "Say hello."}]
    a = client.chat.completions.create(model="smollm2", messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "Again."}]
    b = client.chat.completions.create(model="smollm2", messages=second, max_tokens=8, temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens - 2, "only the new turn is prefilled"


def test_concurrent_requests_each_return_what_they_return_alone(client, alone, server):
    def one(p):
        return client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, PROMPTS))
    assert got == [alone[p][0] for p in PROMPTS]
    assert _busy(server) == 0


def test_load_and_disconnects_leak_no_slot(server):
    def client_run(i):
        texts = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for j in range(10):
                r = c.post("/v1/completions", json=dict(prompt=f"Number {i} {j}:", max_tokens=3, temperature=0))
                assert r.status_code == 200
                texts.append(r.json()["choices"][0]["text"])
        return texts
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client_run, range(16)))
    assert all(len(t) == 10 for t in results)
    assert time.time() - start < 120
    # a client that leaves mid-stream frees its slot
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=dict(prompt="Count: 1, 2,", max_tokens=400,
                                                            temperature=0, stream=True)) as r:
            next(r.iter_lines())
    deadline = time.time() + 30
    while _busy(server):
        assert time.time() < deadline, "the disconnected stream kept its slot"
        time.sleep(0.05)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "ignore_eos": 1}, 400, "ignore_eos"),
    ({"prompt": "word " * (CTX + 10)}, 400, "prompt"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=60, **kwargs)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_chat_messages_are_refused(server):
    for messages in ([], [{"role": "user"}], [{"role": "wizard", "content": "x"}], "hello"):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_api_key_is_checked_on_every_request(engine):
    running = _Running(engine, api_key=KEY)
    try:
        for path in ("/health", "/v1/models"):
            assert httpx.get(running.url + path).status_code == 401
            assert httpx.get(running.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = httpx.get(running.url + path, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
        r = httpx.post(running.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        c = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0)
        assert c.completions.create(model="smollm2", prompt="Hi", max_tokens=2).usage.completion_tokens >= 0
    finally:
        running.stop()


def test_the_serve_command(engine):
    import signal
    import subprocess
    import sys
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qinfer", "serve", "--port", str(port), "--parallel", "2",
                             "--ctx", "256", "--threads", "2", "--model-name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health == {"status": "ok", "slots": 2, "busy": 0}
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["smol"]
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4
        # a second server on the same port: one line, exit 1
        again = subprocess.run([sys.executable, "-m", "qinfer", "serve", "--port", str(port)],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 1
        assert again.stderr.strip().splitlines() == [f"qinfer: error: cannot listen on 127.0.0.1:{port}: "
                                                     "Address already in use"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and err.rstrip().endswith("qinfer: server stopped")
        assert "2 threads, int8 activations" in err     # the server's default (batched steps scale)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_activations_default(monkeypatch):
    from qinfer.cli.serve import serve_activations
    monkeypatch.delenv("QINFER_ACTIVATIONS", raising=False)
    assert serve_activations(None) == "int8"
    assert serve_activations("float") == "float"
    monkeypatch.setenv("QINFER_ACTIVATIONS", "float")
    assert serve_activations(None) == "float"
    assert serve_activations("int8") == "int8"
