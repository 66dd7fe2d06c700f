"""The OpenAI API's requests and responses, as far as qinfer serves them.

A request body is checked field by field into a Request; anything wrong is an
ApiError carrying the HTTP status and the OpenAI-style error body. Fields
that would change the output and that qinfer does not implement
(`logprobs`, `n` > 1, penalties, `logit_bias`, tools, ...) are refused by
name, never ignored; fields that change nothing qinfer computes (`user`,
`stream_options` other than usage) are accepted.
"""
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import List, Optional

from ..errors import QinferError

MAX_STOP_STRINGS = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16      # the OpenAI API's default for /v1/completions


class ApiError(QinferError):
    """A request the server refuses: HTTP `status`, OpenAI error `kind` and `param`."""

    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    kind: str                          # "completion" or "chat"
    prompt: Optional[str]              # completion: the text to continue
    messages: Optional[List[dict]]     # chat: [{"role", "content"}]
    max_tokens: Optional[int]          # None: until end of sequence or a full context
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    stream: bool
    include_usage: bool                # stream_options.include_usage: a last chunk with usage
    echo: bool = False                 # completion: the prompt before the text
    ignore_eos: bool = False           # an extension (llama-server, vLLM): never end at end of sequence


# Fields the API defines that change the output and qinfer does not implement, with the value
# that means "off" (a request may send that value).
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "n": (None, 1), "best_of": (None, 1),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "parallel_tool_calls": (None,)}
HARMLESS = {"model", "user", "stream_options", "metadata", "store", "service_tier"}


def _field(body, name, types, default, what):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _number(body, name, default, low, high):
    value = _field(body, name, (int, float), default, "a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must lie in [{low}, {high}], got {value}", param=name)
    return float(value)


def _stop(body):
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    return [s for s in stop if s]


def _messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):        # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}].role {m['role']!r} is not supported "
                                "(system, developer, user, assistant)", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse(kind, body, model_name):
    """The JSON body of POST /v1/completions (kind "completion") or /v1/chat/completions ("chat")."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise ApiError(400, f"'{name}' is not supported by qinfer", param=name, code="unsupported_parameter")
    unknown = sorted(set(body) - set(UNSUPPORTED) - HARMLESS - set(_KNOWN[kind]))
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}'", param=unknown[0])
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if kind == "completion" else None
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ApiError(400, f"'max_tokens' must be an integer >= 0, got {max_tokens!r}", param="max_tokens")
    seed = _field(body, "seed", (int,), None, "an integer")
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise ApiError(400, f"'seed' must lie in [0, 2**64), got {seed}", param="seed")
    options = _field(body, "stream_options", (dict,), {}, "an object")
    prompt = messages = None
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (one prompt a request)", param="prompt")
    else:
        messages = _messages(body)
    return Request(kind=kind, prompt=prompt, messages=messages, max_tokens=max_tokens,
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                   seed=seed, stop=_stop(body), stream=_field(body, "stream", (bool,), False, "a boolean"),
                   include_usage=bool(options.get("include_usage", False)),
                   echo=_field(body, "echo", (bool,), False, "a boolean") if kind == "completion" else False,
                   ignore_eos=_field(body, "ignore_eos", (bool,), False, "a boolean"))


_KNOWN = {"completion": ("prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "echo",
                         "ignore_eos"),
          "chat": ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                   "stream", "ignore_eos")}


# ------------------------------------------------------------------ responses
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def event(obj):
    """A Server-Sent Event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Response:
    """The bodies of one request's answer: whole, or as stream chunks."""

    def __init__(self, request, model_name):
        self.request, self.model = request, model_name
        prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if request.kind == "chat" else "text_completion"
        self._text_around = None    # text_event's JSON before and after the text

    def _head(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(stats):
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                "total_tokens": stats.prompt_tokens + stats.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}

    def whole(self, text, stats):
        finish = FINISH_REASONS.get(stats.stop_reason, "stop")
        if self.request.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return dict(self._head(self.object), choices=[choice], usage=self.usage(stats))

    def chunk(self, text=None, finish=None, first=False):
        """One streamed piece: text, or the last chunk (finish: the GenerationStats.stop_reason)."""
        reason = FINISH_REASONS.get(finish, "stop") if finish else None
        if self.request.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return dict(self._head("chat.completion.chunk"), choices=[choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return dict(self._head("text_completion"), choices=[choice])

    def text_event(self, text):
        """The Server-Sent Event of a streamed piece of non-empty text, as
        event(self.chunk(text)): the chunk's JSON around the text is made once per
        request, and only the text is encoded for each piece (at 8 streams the event
        loop spends ~20 us of CPU a token; json.dumps of the whole chunk took 7)."""
        if self._text_around is None:
            marker = "\0"
            parts = event(self.chunk(marker)).split(json.dumps(marker, ensure_ascii=False))
            self._text_around = tuple(parts) if len(parts) == 2 else False
        if not self._text_around:
            return event(self.chunk(text))
        head, tail = self._text_around
        return head + json.dumps(text, ensure_ascii=False) + tail

    def usage_chunk(self, stats):
        return dict(self._head("chat.completion.chunk" if self.request.kind == "chat" else "text_completion"),
                    choices=[], usage=self.usage(stats))
