"""The ONE render function: conversation -> text -> token ids. Training, scoring, serving and eval call it.

Recipe of the Skywork-Reward-V2 seed: ``apply_chat_template(tokenize=False)``, strip one leading BOS string,
then tokenize normally (which adds exactly one BOS for Llama-style tokenizers, none for Qwen3). We never add a
system prompt. The reward is read at the last token of the result.
"""

from __future__ import annotations

from typing import Any, Sequence


def render_text(tokenizer, messages: Sequence[dict], chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """Templated string of one conversation, with one leading BOS string removed (the seed's recipe)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, **(chat_template_kwargs or {}))
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Tokenize already-rendered strings the way the seed does (special tokens added by the tokenizer)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def render_ids(tokenizer, messages: Sequence[dict], chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of one conversation; the reward is read at the last id."""
    return tokenize_texts(tokenizer, [render_text(tokenizer, messages, chat_template_kwargs)])[0]


def render_many(tokenizer, conversations: Sequence[Sequence[dict]], chat_template_kwargs=None) -> list[list[int]]:
    """Token ids of many conversations, tokenized in one call (the training data path)."""
    return tokenize_texts(tokenizer, [render_text(tokenizer, c, chat_template_kwargs) for c in conversations])
