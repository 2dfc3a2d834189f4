"""Sources, formats, chat labels and bad records."""

import json

import pytest

from dist_ft.config import ModelConfig, SourceConfig
from dist_ft.data.chat import IGNORE, has_generation_markers, tokenize_conversation
from dist_ft.data.formats import to_conversation
from dist_ft.data.sources import read_records
from dist_ft.errors import UserError
from dist_ft.tokenizer import load_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the apple?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And the banana?"},
    {"role": "assistant", "content": "Yellow."},
]


def test_all_formats_become_the_same_conversation():
    openai = {"messages": CONV}
    sharegpt = {
        "conversations": [
            {
                "from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                "value": m["content"],
            }
            for m in CONV
        ]
    }
    assert to_conversation(openai, "auto", "r").messages == CONV
    assert to_conversation(sharegpt, "auto", "r").messages == CONV
    alpaca = {"instruction": "What color is the apple?", "input": "", "output": "Red.", "system": "Be brief."}
    assert to_conversation(alpaca, "auto", "r").messages == CONV[:3]
    with_input = to_conversation(
        {"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca", "r"
    )
    assert with_input.messages[0] == {"role": "user", "content": "Translate\n\nchat"}
    assert to_conversation({"text": "raw words"}, "auto", "r").text == "raw words"


@pytest.mark.parametrize(
    "rec,msg",
    [
        (
            {"prompt": "x", "completion": "y"},
            r"f.jsonl:3: unknown record format \(keys: completion, prompt\)",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"f.jsonl:3: conversation has no assistant turn"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
            r"roles out of order at message 0 \('assistant', expected 'user'\)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            r"roles out of order at message 1",
        ),
        ({"conversations": [{"from": "alien", "value": "x"}]}, r"unknown speaker 'alien'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            r"unknown role 'bot'",
        ),
    ],
)
def test_bad_records_name_the_record(rec, msg):
    with pytest.raises(UserError, match=msg):
        to_conversation(rec, "auto", "f.jsonl:3")


def test_sources_jsonl_json_parquet_agree(tmp_path):
    recs = [{"messages": CONV}, {"text": "hello"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(recs))
    import datasets

    datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}]).to_parquet(str(tmp_path / "a.parquet"))
    assert [r for _, r in read_records(SourceConfig(path=str(tmp_path / "a.jsonl")))] == recs
    assert [r for _, r in read_records(SourceConfig(path=str(tmp_path / "a.json")))] == recs
    assert [r["text"] for _, r in read_records(SourceConfig(path=str(tmp_path / "a.parquet")))] == [
        "hello",
        "world",
    ]


def test_source_errors(tmp_path):
    with pytest.raises(UserError, match=r"missing.jsonl: no such file"):
        read_records(SourceConfig(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"empty.jsonl: no records"):
        read_records(SourceConfig(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        read_records(SourceConfig(path=str(tmp_path / "bad.jsonl")))


def _assistant_pieces(tok, ex):
    """Decode each maximal run of loss-bearing tokens."""
    pieces, run = [], []
    for t, lab in zip(ex.input_ids, ex.labels, strict=False):
        if lab != IGNORE:
            assert lab == t
            run.append(t)
        elif run:
            pieces.append(tok.decode(run))
            run = []
    if run:
        pieces.append(tok.decode(run))
    return pieces


def test_labels_cover_exactly_assistant_turns_gpt2_chatml(gpt2_dir):
    tok = load_tokenizer(ModelConfig(path=str(gpt2_dir)))
    assert has_generation_markers(tok)  # our ChatML was added to the base model
    ex = tokenize_conversation(tok, to_conversation({"messages": CONV}, "auto", "r"), "r")
    assert _assistant_pieces(tok, ex) == ["Red.<|im_end|>", "Yellow.<|im_end|>"]
    # and every other token is masked: the unmasked text rebuilt around them is the full render
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONV, tokenize=False)


def test_labels_without_generation_markers_llama(llama_dir):
    tok = load_tokenizer(ModelConfig(path=str(llama_dir)))
    assert tok.chat_template and not has_generation_markers(tok)  # its own template is kept
    ex = tokenize_conversation(tok, to_conversation({"messages": CONV}, "auto", "r"), "r")
    assert _assistant_pieces(tok, ex) == ["Red.</s>", "Yellow.</s>"]
    assert sum(lab != IGNORE for lab in ex.labels) == len(
        tok("Red.</s>Yellow.</s>", add_special_tokens=False)["input_ids"]
    )


def test_pad_token_is_provided(gpt2_dir, llama_dir):
    for d in (gpt2_dir, llama_dir):
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(d).pad_token is None  # the saved tokenizers have none
        tok = load_tokenizer(ModelConfig(path=str(d)))
        assert tok.pad_token is not None and tok.pad_token_id is not None
