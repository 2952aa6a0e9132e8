"""``dirl make-tiny-model --out DIR [key=value ...]``: the embedded default model (its shape unless
shape arguments say otherwise)."""

from __future__ import annotations

import argparse

from dirl.config import TinyModelConfig, check_tiny, embedded_tiny_shape, load_config
from dirl.model.tiny import build_tiny_model, count_parameters
from dirl.train.checkpoint import mark_untrained


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dirl make-tiny-model",
        description="Write a tiny randomly initialised SDAR model and its character-level tokenizer: the "
        "embedded default's shape (hidden 128, 3 layers, 0.77M parameters) unless overridden. Shape overrides are "
        "TinyModelConfig fields, e.g. hidden_size=256 num_hidden_layers=4 seed=1.",
    )
    p.add_argument("--out", required=True, help="output folder (SDAR layout)")
    p.add_argument("--config", default=None, help="YAML file with TinyModelConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides of TinyModelConfig")
    args = p.parse_args(argv)
    cfg = load_config(TinyModelConfig, args.config, args.overrides, base=embedded_tiny_shape())
    check_tiny(cfg, prefix="")  # before anything is built or written

    model, tok = build_tiny_model(cfg)
    out = model.save_pretrained(args.out, tokenizer=tok)
    mark_untrained(out)
    print(f"tiny SDAR model: {count_parameters(model):,} parameters, vocab {len(tok)}, "
          f"block_size {model.block_size}, mask_token_id {model.mask_token_id} -> {out}")
    return 0
