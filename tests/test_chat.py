"""`qinfer chat`: the conversation loop (ChatSession) and the command through a pseudo-terminal."""
import os
import pty
import select
import subprocess
import sys
import time

import pytest

import llama_reference as ref
import qinfer
from qinfer.cli.chat import ChatSession
from qinfer.errors import QinferError


@pytest.fixture(scope="module")
def engine():
    ref.smollm2_path()
    return qinfer.Engine(threads=2, ctx=1024)


def test_turns_reuse_the_cache_and_reset_clears_it(engine):
    chat = ChatSession(engine, system="You are brief.", max_new_tokens=12)
    first = "".join(chat.reply("What is the capital of France?"))
    assert first and chat.messages[-1] == {"role": "assistant", "content": first}
    one = engine.last_stats
    assert one.cached_tokens == 0
    second = "".join(chat.reply("And of Italy?"))
    two = engine.last_stats
    assert two.cached_tokens >= one.prompt_tokens - 2, "the first turn comes from the KV cache"
    # the reply is the one a fresh engine gives the same conversation (reuse changes nothing visible)
    fresh = engine.chat(chat.messages[:-1], max_new_tokens=12, reuse_cache=False)
    assert second == fresh
    assert chat.command("/reset") == "(conversation cleared)"
    assert chat.messages == [{"role": "system", "content": "You are brief."}] and engine.cached_ids == []
    "".join(chat.reply("Hi"))
    assert engine.last_stats.cached_tokens == 0
    assert "system message set" in chat.command("/system Be formal.")
    assert chat.messages == [{"role": "system", "content": "Be formal."}]
    assert chat.command("/nonsense").startswith("unknown command")
    assert chat.command("/exit") is None


def test_a_stopped_reply_stays_as_far_as_it_got(engine):
    chat = ChatSession(engine, max_new_tokens=50)
    pieces = chat.reply("Count from one to twenty.")
    got = next(pieces) + next(pieces)
    pieces.close()                      # what Ctrl-C does to the loop
    assert chat.messages[-1] == {"role": "assistant", "content": got}


def test_a_model_without_a_chat_template_is_refused(engine):
    template, engine.chat_template = engine.chat_template, None
    try:
        with pytest.raises(QinferError, match="chat template"):
            ChatSession(engine)
    finally:
        engine.chat_template = template


def _read_until(fd, marker, timeout=120):
    out = b""
    deadline = time.time() + timeout
    while marker not in out:
        assert time.time() < deadline, f"no {marker!r} in {out[-400:]!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_the_command_in_a_terminal(tmp_path):
    ref.smollm2_path()
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qinfer", "chat", "--ctx", "512", "--max-new-tokens", "8",
                             "--threads", "2"], stdin=child, stdout=child, stderr=child, close_fds=True,
                            env=dict(os.environ, TERM="dumb"))
    os.close(child)
    try:
        _read_until(main, b"> ")
        os.write(main, b"What is 2+2?\n")
        out = _read_until(main, b"prompt tokens prefilled]")
        os.write(main, b"And 3+3?\n")
        out = _read_until(main, b"prompt tokens prefilled]")
        line = out[out.rindex(b"["):]
        prefilled, total = (int(x) for x in line.split(b"tokens/s, ")[1].split(b" prompt")[0].split(b" of "))
        assert prefilled < total, f"the second turn prefilled everything: {line!r}"
        os.write(main, b"/reset\n")
        _read_until(main, b"(conversation cleared)")
        os.write(main, b"/exit\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
