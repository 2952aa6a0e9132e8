"""The embedded default model: a tiny Qwen3/SDAR decoder with a character-level tokenizer.

The tokenizer is a real ``PreTrainedTokenizerFast`` (saved as ``tokenizer.json``) with the Qwen chat
format: ``<|im_start|>role\\n...<|im_end|>\\n``. Special tokens mirror Qwen's roles: ``<|endoftext|>``
(pad, stop), ``<|im_start|>``, ``<|im_end|>`` (end of turn, stop) and ``<|MASK|>``. Every printable
ASCII character is one token, plus a few whole words of the chat format (``user``, ``assistant``,
``system``) and ``\\boxed`` to keep sequences short. Everything is deterministic given the seed.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from dirl.config import TinyModelConfig
from dirl.model.sdar import SDARModel

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<|MASK|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, MASK_TOKEN, UNK_TOKEN]
WORD_TOKENS = ["user", "assistant", "system", "\\boxed"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """The tiny model's tokenizer (character level, Qwen chat format)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + space + \n
    vocab: dict[str, int] = {}
    for t in SPECIAL_TOKENS + WORD_TOKENS + chars:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, MASK_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def build_tiny_model(cfg: TinyModelConfig | None = None, tokenizer=None):
    """A randomly initialised SDAR model (an :class:`~dirl.model.sdar.SDARModel`) and its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = cfg or TinyModelConfig()
    tokenizer = tokenizer or build_tokenizer()
    hf_cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        bos_token_id=None,
        attention_bias=False,
        use_cache=True,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hf = Qwen3ForCausalLM(hf_cfg)
    # Re-initialise from our own generator so the weights depend on the seed alone.
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters()):
            if p.dim() == 1:  # norms
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * hf_cfg.initializer_range)
    hf.set_attn_implementation("sdpa")
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    return SDARModel(hf, cfg.block_size, mask_id, attn_backend="auto"), tokenizer


def make_tiny_model(out_dir: str | os.PathLike, cfg: TinyModelConfig | None = None) -> Path:
    """Write the embedded default model (SDAR layout + tokenizer) to ``out_dir``."""
    model, tok = build_tiny_model(cfg)
    return model.save_pretrained(out_dir, tokenizer=tok)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
