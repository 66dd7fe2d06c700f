"""Rendering a conversation with the model's own chat template (jinja2, sandboxed)."""
from .errors import QinferError


class ChatTemplateError(QinferError):
    """The model has no chat template, or rendering it failed."""


def _raise(message):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"each message needs string 'role' and 'content', got {m!r}")


def render_chat(template, messages, tokenizer, add_generation_prompt=True):
    if not template:
        raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
    check_messages(messages)
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    piece = lambda i: tokenizer.id_to_piece(i) if i is not None else ""
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template could not be rendered: {exc}") from None
