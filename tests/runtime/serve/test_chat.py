"""Chat messages into a prompt, with the real tokenizer of a local tiny model: kubelm's default template
for a tokenizer without one, the tokenizer's own, the LanguageModel's above both, and a refusal in the
client's words when a template cannot render the conversation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubelm_contract import protocol
from kubelm_contract.protocol import ProtocolError
from kubelm_runtime.serve import chat

CONVERSATION = (("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello."), ("user", "Tell me more"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_a_tokenizer_without_a_template_gets_the_documented_default(tokenizer: Any) -> None:
    assert tokenizer.chat_template is None
    template = chat.template_for(tokenizer, None)
    assert template == chat.DEFAULT_TEMPLATE
    assert chat.render(tokenizer, template, CONVERSATION) == (
        "system: Be brief.\nuser: Hi there\nassistant: Hello.\nuser: Tell me more\nassistant:")


def test_the_models_template_and_then_the_tokenizers_win_over_the_default(tokenizer: Any) -> None:
    own = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
           "{% if add_generation_prompt %}<|a|>{% endif %}")
    tokenizer.chat_template = own
    try:
        assert chat.template_for(tokenizer, None) == own
        assert chat.render(tokenizer, chat.template_for(tokenizer, None), CONVERSATION[:2]) == \
            "<|system|>Be brief.<|user|>Hi there<|a|>"
        configured = "{{ messages[-1]['content'] | upper }}"
        assert chat.template_for(tokenizer, configured) == configured
        assert chat.render(tokenizer, configured, CONVERSATION) == "TELL ME MORE"
    finally:
        tokenizer.chat_template = None


@pytest.mark.parametrize(("template", "words"), [
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages, please') }}{% endif %}",
     "no system messages, please"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),  # the sandbox holds
    ("{% for m in messages %}", "TemplateSyntaxError"),
])
def test_a_template_that_cannot_render_is_the_clients_error_with_its_words(tokenizer: Any, template: str,
                                                                         words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        chat.render(tokenizer, template, CONVERSATION)
    assert info.value.kind == protocol.INVALID_REQUEST and words in str(info.value)
