"""Chat-format helpers shared by SFT, rollouts and evaluation."""

from __future__ import annotations

from typing import Any, Sequence

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def render_prompt(tokenizer: Any, messages: Sequence[dict] | str) -> str:
    """The chat-templated prompt text, ending with the assistant header. A plain string is taken as
    the user turn."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added around it."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, messages: Sequence[dict] | str) -> list[int]:
    return encode(tokenizer, render_prompt(tokenizer, messages))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids of ``<|im_end|>`` and ``<|endoftext|>`` that the tokenizer knows (SPEC section 1)."""
    ids = []
    vocab = tokenizer.get_vocab()
    for t in STOP_TOKENS:
        if t in vocab:
            ids.append(int(vocab[t]))
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def end_of_turn_text(tokenizer: Any) -> str:
    """What closes an assistant response in the chat format (``<|im_end|>\\n``)."""
    return "<|im_end|>\n" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")
