"""Chat messages into the one prompt a causal LM continues.

The template is the LanguageModel's `generation.chatTemplate` when set, else the tokenizer's own (models
trained for chat ship one), else DEFAULT_TEMPLATE, for models that have none (GPT-2): one "role: content"
line per message, then "assistant:" for the model to continue. Templates are Jinja, rendered by
`transformers` in its sandbox with the variables Hugging Face chat templates expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubelm_contract import protocol
from kubelm_contract.protocol import ProtocolError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def template_for(tokenizer: Any, configured: str | None) -> str:
    return configured or getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE


def render(tokenizer: Any, template: str, messages: Sequence[tuple[str, str]]) -> str:
    """The prompt for a conversation; a template that refuses it (many raise on an unexpected order of
    roles) or fails is the client's error to read, with the template's own words."""
    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        prompt = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError and SecurityError, and whatever a template raises
        raise ProtocolError(protocol.INVALID_REQUEST, f"the chat template cannot render these messages: "
                                                      f"{type(e).__name__}: {e}") from e
    if not isinstance(prompt, str):
        raise ProtocolError(protocol.INTERNAL, f"the chat template rendered {type(prompt).__name__}, not text")
    return prompt
