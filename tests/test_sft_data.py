"""SFT data: row formats, error locations, chat-template tokenisation, block padding, packing, order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dirl.data.formats import (
    DataError,
    FieldNames,
    SFTExample,
    parse_sft_row,
    read_sft_examples,
    synthetic_sft_examples,
)
from dirl.data.sft import (
    PackedSFTData,
    RowStream,
    TokenizedSample,
    pack_lengths,
    rank_row_slice,
    tokenize_examples,
)
from dirl.model.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------


def test_both_row_shapes_parse(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "2"}]},
        {"prompt": "2+2?", "response": "4"},
        {"prompt": [{"role": "user", "content": "3+3?"}], "response": "6"},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = read_sft_examples(str(f))
    assert [e.response for e in ex] == ["2", "4", "6"]
    assert ex[0].prompt == rows[0]["messages"][:2]
    assert ex[1].prompt == [{"role": "user", "content": "2+2?"}]
    assert ex[2].where == f"{f}:3"
    # a JSON array file gives the same rows, with the line each element starts on
    g = tmp_path / "d.json"
    g.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    ex2 = read_sft_examples(str(g))
    assert [e.response for e in ex2] == ["2", "4", "6"] and ex2[1].where == f"{g}:3"


def test_custom_field_names():
    ex = parse_sft_row({"q": "hi", "a": "yo"}, "x", FieldNames(prompt="q", response="a"))
    assert ex.prompt == [{"role": "user", "content": "hi"}] and ex.response == "yo"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "1+1?"}', "missing field 'response'"),
        ('{"prompt": "1+1?", "response": 2}', "'response' must be a string"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "must be the assistant's response"),
        ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "role must be one of"),
        ('{"messages": "hello"}', "non-empty list"),
        ('{"text": "hello"}', "expected 'messages' or 'prompt'/'response'"),
        ('[1, 2]', "a row must be a JSON object"),
        ('{"prompt": "1+1?", "response": "2"', "invalid JSON"),
        ('{"prompt": "1+1?", "response": "  "}', "'response' is empty"),
        ('{"prompt": "", "response": "2"}', "'prompt' is empty"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
         "the assistant's response in 'messages' is empty"),
        ('{"messages": [{"role": "system", "content": " "}, {"role": "assistant", "content": "a"}]}',
         "the prompt turns of 'messages' are all empty"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|endoftext|>b"}]}',
         "messages[1].content holds the chat-template token <|endoftext|>"),
        ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x<|endoftext|>"}], "response": "y"}',
         "prompt[1].content holds the chat-template token <|endoftext|>"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"})
    f.write_text(f"{good}\n{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        read_sft_examples(str(f))
    assert str(e.value).startswith(f"{f}:4: "), str(e.value)
    assert message in str(e.value)


def test_bad_element_of_json_array_names_its_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a",\n   "answer": 3}\n]\n')
    with pytest.raises(DataError, match=rf"^{f}:3: missing field 'response'"):
        read_sft_examples(str(f))


def test_json_array_files_read_whole_or_not_at_all(tmp_path):
    """A second array after the first (two files pasted together) is an error, not silently dropped
    rows; a byte-order mark at the start of a file (some editors write one) is skipped."""
    row = {"prompt": "a", "response": "b"}
    f = tmp_path / "two.json"
    f.write_text(json.dumps([row]) + "\n" + json.dumps([row, row]) + "\n")
    with pytest.raises(DataError, match=rf"^{f}:2: more data after the JSON array's closing"):
        read_sft_examples(str(f))
    f.write_text("[]\n[1]")
    with pytest.raises(DataError, match=rf"^{f}:2: more data"):
        read_sft_examples(str(f))
    for name, text in (("bom.json", json.dumps([row, row])), ("bom.jsonl", json.dumps(row) + "\n" + json.dumps(row))):
        g = tmp_path / name
        g.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [e.response for e in read_sft_examples(str(g))] == ["b", "b"], name


def test_a_file_is_read_whole_unless_num_samples_says_otherwise(tmp_path):
    from dirl.train.sft import load_sft_config, load_sft_examples

    f = tmp_path / "big.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(7005)))
    cfg = load_sft_config(None, [f"data.source={f}"])
    assert cfg.data.num_samples == 0 and len(load_sft_examples(cfg.data)) == 7005
    cfg = load_sft_config(None, [f"data.source={f}", "data.num_samples=10"])
    assert len(load_sft_examples(cfg.data)) == 10
    # the synthetic task's own size stays the default for it, also through the shipped config
    assert load_sft_config(None, []).data.num_samples == 7000
    assert load_sft_config(str(ROOT / "configs" / "sft_default.yaml"), []).data.num_samples == 7000
    assert load_sft_config(str(ROOT / "configs" / "sft_default.yaml"), [f"data.source={f}"]).data.num_samples == 0


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_sft_examples(str(tmp_path / "nope.jsonl"))


def test_bad_row_stops_training_with_file_and_line(tmp_path):
    from dirl.train.sft import build_sft_data, load_sft_config

    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "reply": "b"}\n')
    cfg = load_sft_config(None, [f"data.source={f}"])
    with pytest.raises(DataError, match=rf"{f}:2: missing field 'response'"):
        build_sft_data(cfg, build_tokenizer(), 4)


# --------------------------------------------------------------------------------------------
# tokenisation and block padding
# --------------------------------------------------------------------------------------------


def test_prompt_is_chat_template_and_response_is_block_padded(tok):
    ex = SFTExample(prompt=[{"role": "user", "content": "What is 1+2?"}], response="1+2=3. \\boxed{3}")
    for B in (1, 4, 7):
        s = tokenize_examples(tok, [ex], B)[0]
        text = tok.decode(s.input_ids)
        prompt_text = tok.decode(s.input_ids[:s.n_prompt])
        assert prompt_text == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
        assert len(s.input_ids) % B == 0  # the whole sample ends on a block boundary
        body = "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n1+2=3. \\boxed{3}<|im_end|>\n"
        assert text.startswith(body)
        n_pad = len(s.input_ids) - len(tok(body, add_special_tokens=False)["input_ids"])
        assert 0 <= n_pad < B
        assert s.input_ids[len(s.input_ids) - n_pad:] == [tok.pad_token_id] * n_pad
        assert s.n_labelled == len(s.input_ids) - s.n_prompt  # pads are labelled targets


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def _samples(lengths, n_prompt=3):
    return [TokenizedSample(input_ids=list(range(100 + i, 100 + i + n)), n_prompt=min(n_prompt, n - 1))
            for i, n in enumerate(lengths)]


def test_packing_rows_docs_positions_and_labels():
    lengths = [8, 12, 4, 20, 16, 8, 30, 4]
    data = PackedSFTData(_samples(lengths), row_len=24, pad_id=0)
    assert data.stats.n_dropped == 1  # the 30-token sample is longer than a row
    assert data.stats.n_samples == 7
    seen = []
    for r in range(len(data)):
        row = data.row(r)
        ids, pos, doc, lab = row["input_ids"], row["pos"], row["doc"], row["labels"]
        assert ids.shape == (24,)
        for d in doc.unique().tolist():
            sel = doc == d
            idx = sel.nonzero().flatten()
            assert torch.equal(idx, torch.arange(idx[0], idx[-1] + 1))  # contiguous
            assert torch.equal(pos[sel], torch.arange(int(sel.sum())))  # positions restart at 0
        for s in data.row_samples(r):
            a, b = data.offsets[s], data.offsets[s + 1]
            seen.append(tuple(data.tokens[a:b].tolist()))
        # tail padding: its own doc, pad tokens, no labels
        used = sum(int(data.offsets[s + 1] - data.offsets[s]) for s in data.row_samples(r))
        if used < 24:
            tail = doc[used:]
            assert (tail == tail[0]).all() and tail[0] == doc[:used].max() + 1
            assert (ids[used:] == 0).all() and not lab[used:].any()
        # labels: exactly the non-prompt tokens of each sample
        n_lab = sum(int(data.offsets[s + 1] - data.offsets[s]) - int(data.n_prompt[s]) for s in data.row_samples(r))
        assert int(lab.sum()) == n_lab
    kept = sorted(tuple(s.input_ids) for s, n in zip(_samples(lengths), lengths) if n <= 24)
    assert sorted(seen) == kept  # every kept sample exactly once


def test_the_block_pads_of_the_last_block_are_labelled_targets_in_packed_rows(tok):
    """SPEC section 3: the pad tokens that complete a sample's last block are labelled targets
    (they take loss and can be masked), unlike the row's tail padding."""
    from dirl.train.noise import sample_noise

    B = 4
    exs = [SFTExample(prompt=[{"role": "user", "content": "q" * (i % 3)}], response="r" * (1 + i)) for i in range(8)]
    samples = tokenize_examples(tok, exs, B)
    pad = tok.pad_token_id
    data = PackedSFTData(samples, row_len=64, pad_id=pad)
    checked = 0
    for r in range(len(data)):
        row = data.row(r)
        ids, doc, lab = row["input_ids"], row["doc"], row["labels"]
        at = 0
        for s in data.row_samples(r):
            n = int(data.offsets[s + 1] - data.offsets[s])
            sample_ids = ids[at:at + n].tolist()
            k = 0  # block pads: the trailing pad tokens of the sample
            while k < n and sample_ids[n - 1 - k] == pad:
                k += 1
            assert k < B
            assert lab[at + int(data.n_prompt[s]):at + n].all()  # every response token, pads included
            assert not lab[at:at + int(data.n_prompt[s])].any()
            checked += k
            at += n
    assert checked > 0
    # with eps = 1 (p = 1) the noise masks every labelled token, block pads included
    batch = data.rows(range(len(data)))
    masked, p = sample_noise(batch["labels"], batch["doc"], seed=0, first_global_row=0, eps=1.0)  # p = 1
    assert torch.equal(masked, batch["labels"])
    assert bool((masked & (batch["input_ids"] == pad)).any())


def test_best_fit_packing_is_tight_and_deterministic():
    lengths = [40, 44] * 30
    rows, dropped = pack_lengths(lengths, 128)
    assert not dropped
    assert sorted(i for r in rows for i in r) == list(range(60))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert pack_lengths(lengths, 128) == (rows, dropped)
    assert len(rows) == 20  # 44 + 44 + 40 = 128 exactly


def test_synthetic_data_packs_densely_when_rows_fit_whole_samples(tok):
    # samples are 44 or 48 tokens: rows of 144 take three (the default's rows of 128 take two, ~74%)
    samples = tokenize_examples(tok, synthetic_sft_examples("train", n=300), 4)
    assert {len(s.input_ids) for s in samples} <= {44, 48}
    data = PackedSFTData(samples, 144, tok.pad_token_id)
    assert data.stats.efficiency > 0.95
    assert data.stats.n_dropped == 0
    assert PackedSFTData(samples, 128, tok.pad_token_id).stats.efficiency > 0.7


def test_row_stream_is_seeded_and_resumable():
    a, b = RowStream(10, seed=3), RowStream(10, seed=3)
    seq = a.rows_at(0, 35)
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert seq[:10] != seq[10:20]  # a new permutation every epoch
    assert b.rows_at(17, 10) == seq[17:27]  # any cursor gives the same order
    assert RowStream(10, seed=4).rows_at(0, 10) != seq[:10]


def test_step_slices_cover_the_global_batch():
    for world in (1, 2, 4):
        got = []
        for r in range(world):
            s, n = rank_row_slice(24, 8, r, world)
            got += list(range(s, s + n))
        assert got == list(range(24, 32))
    with pytest.raises(ValueError):
        rank_row_slice(0, 6, 0, 4)


# --------------------------------------------------------------------------------------------
# DiRL's own (already templated) SFT rows
# --------------------------------------------------------------------------------------------

DIRL_ROWS = [  # exactly the shape of DiRL's SFT data (Light-OpenR1Math-SFT)
    {"prompt": "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n",
     "response": "1+2=3. \\boxed{3}<|im_end|><|endoftext|>"},
    {"prompt": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n7*6?<|im_end|>\n<|im_start|>assistant\n",
     "response": "42<|im_end|><|endoftext|>"},
]


def _expected_ids(tok, text: str) -> list[int]:
    """Token ids of ``text`` for the tiny character-level tokenizer, spelled out from its vocabulary:
    special and whole-word tokens by longest match, every other character on its own."""
    vocab = tok.get_vocab()
    words = sorted((t for t in vocab if len(t) > 1), key=len, reverse=True)
    out, i = [], 0
    while i < len(text):
        w = next((w for w in words if text.startswith(w, i)), None)
        if w is None:
            w = text[i]
        out.append(vocab[w])
        i += len(w)
    return out


def test_the_tiny_tokenizer_has_dirls_special_tokens(tok):
    vocab = tok.get_vocab()
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert t in vocab
        assert tok.convert_ids_to_tokens(vocab[t]) == t


def test_dirl_rows_tokenise_to_exactly_their_own_text(tok, tmp_path):
    f = tmp_path / "dirl_sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in DIRL_ROWS))
    examples = read_sft_examples(str(f))
    assert all(e.templated for e in examples)
    samples = tokenize_examples(tok, examples, block_size=4)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    for row, s in zip(DIRL_ROWS, samples):
        p_ids = _expected_ids(tok, row["prompt"])
        r_ids = _expected_ids(tok, row["response"])
        n_pad = (-(len(p_ids) + len(r_ids))) % 4
        assert s.input_ids == p_ids + r_ids + [pad] * n_pad
        assert s.n_prompt == len(p_ids)  # the boundary is where the row puts it
        assert tok.decode(s.input_ids[: s.n_prompt]) == row["prompt"]
        assert tok.decode(s.input_ids[s.n_prompt:len(s.input_ids) - n_pad]) == row["response"]
        text = tok.decode(s.input_ids)
        assert text.count("<|im_start|>") == row["prompt"].count("<|im_start|>")  # never templated twice
        assert text.count("<|im_end|>") == row["prompt"].count("<|im_end|>") + 1  # no second end of turn


def test_a_plain_pair_still_gets_the_template_and_end_of_turn(tok):
    ex = parse_sft_row({"prompt": "What is 1+2?", "response": "3"}, "x:1")
    assert not ex.templated
    s = tokenize_examples(tok, [ex], block_size=4)[0]
    want = "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(s.input_ids[: s.n_prompt]) == want
    assert tok.decode(s.input_ids[s.n_prompt:]).startswith("3<|im_end|>\n")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "response": "hello"},
     "'prompt' is chat-templated text (DiRL's format) but 'response' does not end with <|im_end|>"),
    ({"prompt": "hi", "response": "hello<|im_end|><|endoftext|>"},
     "'response' ends with <|endoftext|> but 'prompt' is plain text"),
    ({"prompt": "hi", "response": "hello<|im_end|>"},
     "'response' ends with <|im_end|> but 'prompt' is plain text"),
    ({"prompt": "<|im_start|>user\nhi<|im_end|>\n", "response": "hello<|im_end|>"},
     "does not end with the assistant header"),
    ({"messages": [{"role": "user", "content": "<|im_start|>user\nhi<|im_end|>\n"},
                   {"role": "assistant", "content": "hello"}]},
     "messages[0].content holds the chat-template token <|im_start|>"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello<|endoftext|>"}]},
     "already ends its turn"),
    # a plain pair is held to what the messages shape is held to: no turn ends inside it
    ({"prompt": "hi<|im_end|>", "response": "x"}, "'prompt' holds the chat-template token <|im_end|>"),
    ({"prompt": "hi", "response": "x<|im_end|>y"}, "'response' holds the chat-template token <|im_end|>"),
    ({"prompt": "hi", "response": "x<|endoftext|>y"}, "'response' holds the chat-template token <|endoftext|>"),
])
def test_a_row_mixing_the_two_styles_names_file_and_line(tmp_path, row, message):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps(DIRL_ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        read_sft_examples(str(f))
    assert str(e.value).startswith(f"{f}:2: ")
    assert message in str(e.value)
