"""SDAR model: checkpoints, the block-diffusion attention rule, and the embedded tiny model."""

from dirl.model.attention import TokenMeta, allowed, block_causal_meta, build_mask, dense_mask, sft_meta
from dirl.model.sdar import SDARModel, load_model, load_tokenizer, read_checkpoint_config

__all__ = [
    "TokenMeta", "allowed", "block_causal_meta", "build_mask", "dense_mask", "sft_meta",
    "SDARModel", "load_model", "load_tokenizer", "read_checkpoint_config",
]
