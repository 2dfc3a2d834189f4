"""Tool calling and per-turn control in SFT conversations (dist_ft/data/tools.py, formats.py, chat.py).

Labels of a tool-calling conversation cover exactly the assistant's call and its final answer (each with its
end of turn), token by token, never the tool result or the tool list: with our ChatML template (generation
markers) and with a template of its own tool syntax (no markers: spans from rendering message prefixes). The
oracle is independent of both: the labelled tokens form exactly two runs, whose decoded text is the call and
the answer as the template writes them. `"train": false` and `data.train_on: last_assistant` drop turns from
the loss; each bad tool record fails in one line naming the message."""

from __future__ import annotations

import json

import pytest

from dist_ft.config import DataConfig, ModelConfig
from dist_ft.data.chat import IGNORE, tokenize_conversation
from dist_ft.data.formats import to_conversation
from dist_ft.data.tools import parse_calls
from dist_ft.errors import UserError
from dist_ft.tasks import sft
from dist_ft.tokenizer import load_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now in a city of Veloria",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Quenmar"}'},
}


def _record(**over) -> dict:
    msgs = [
        {"role": "system", "content": "You answer about Veloria."},
        {"role": "user", "content": "What is the weather in Quenmar?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain, 12 C"},
        {"role": "assistant", "content": "It rains in Quenmar, 12 C."},
    ]
    return {"messages": msgs, "tools": TOOLS, **over}


# a template with its own tool syntax and no {% generation %} markers
OWN = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{- '<|assistant|>\n' }}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] %}{%- for c in m['tool_calls'] %}"
    "{{- '[CALL ' + c['function']['name'] + ' ' + c['function']['arguments'] | tojson + ']' }}{%- endfor %}"
    "{%- else %}{{- m['content'] }}{%- endif %}{{- '</s>\n' }}"
    "{%- elif m['role'] == 'tool' %}{{- '<|user|>\n[RESULT ' + m['content'] + ']</s>\n' }}"
    "{%- elif m['role'] == 'system' %}{{- '<|system|>\n' + m['content'] + ' Tools: ' + tools | tojson + '</s>\n' }}"
    "{%- else %}{{- '<|user|>\n' + m['content'] + '</s>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)

WANT = {
    "chatml": [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Quenmar"}}</tool_call><|im_end|>',
        "It rains in Quenmar, 12 C.<|im_end|>",
    ],
    "own": ['[CALL get_weather {"city": "Quenmar"}]</s>', "It rains in Quenmar, 12 C.</s>"],
}


@pytest.fixture(scope="module", params=["chatml", "own"])
def tok(request, gpt2_dir, llama_dir):
    if request.param == "chatml":
        return request.param, load_tokenizer(ModelConfig(path=str(gpt2_dir)))
    t = load_tokenizer(ModelConfig(path=str(llama_dir)))
    t.chat_template = OWN
    return request.param, t


def _runs(tok, labels: list[int]) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs, cur = [], []
    for t in labels:
        if t == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.unit
def test_labels_cover_the_call_and_the_answer_never_the_tool_result(tok):
    name, t = tok
    conv = to_conversation(_record(), "auto", "r.jsonl:1")
    ex = tokenize_conversation(t, conv, "r.jsonl:1")
    assert _runs(t, ex.labels) == WANT[name]
    # the tool list reached the template (it is in the rendered prompt) and carries no loss
    text = t.decode(ex.input_ids, skip_special_tokens=False)
    assert "The weather now in a city of Veloria" in text and "rain, 12 C" in text


@pytest.mark.unit
def test_a_turn_marked_train_false_or_not_last_carries_no_loss(tok):
    name, t = tok
    rec = _record()
    rec["messages"][2] = {**rec["messages"][2], "train": False}
    ex = tokenize_conversation(t, to_conversation(rec, "auto", "r:1"), "r:1")
    assert _runs(t, ex.labels) == WANT[name][1:]
    ex = tokenize_conversation(t, to_conversation(_record(), "auto", "r:1"), "r:1", "last_assistant")
    assert _runs(t, ex.labels) == WANT[name][1:]
    rec["messages"][4] = {**rec["messages"][4], "train": False}
    with pytest.raises(UserError, match="no assistant turn of this conversation carries loss"):
        tokenize_conversation(t, to_conversation(rec, "auto", "r:1"), "r:1")


@pytest.mark.unit
def test_data_train_on_reaches_the_sft_examples(gpt2_dir):
    t = load_tokenizer(ModelConfig(path=str(gpt2_dir)))
    cfg = DataConfig(train="x.jsonl", max_seq_len=512, train_on="last_assistant")
    [ex], _ = sft.examples(_record(), "r:1", cfg, t)
    assert _runs(t, ex.labels) == WANT["chatml"][1:]


def _with(i: int, **change) -> dict:
    rec = _record()
    rec["messages"][i] = {**rec["messages"][i], **change}
    return rec


@pytest.mark.unit
@pytest.mark.parametrize(
    "rec, why",
    [
        (
            _with(3, tool_call_id="call_9"),
            r"message 3 is a tool result for call id 'call_9', which no call before",
        ),
        (
            _with(
                2, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": "{city: Quenmar}"}}]
            ),
            r"message 2: the arguments of the call to 'get_weather' are not JSON",
        ),
        (
            _with(2, tool_calls=[{**CALL, "function": {"name": "launch", "arguments": "{}"}}]),
            r"message 2 calls tool 'launch', which is not defined \(the record's tools are get_weather\)",
        ),
        (
            {**_record(), "tools": None},
            r"calls tool 'get_weather', which is not defined \(the record has no 'tools'\)",
        ),
        ({**_record(), "tools": [{"name": "x"}]}, r"'tools' must be a list of function definitions"),
        (_with(3, role="user"), r"roles out of order at message 3 \('user', expected 'tool'\)"),
        (_with(1, train=False), r"'train' is true or false on an assistant message"),
    ],
)
def test_each_bad_tool_record_fails_in_one_line(rec, why):
    with pytest.raises(UserError, match=why) as e:
        to_conversation(rec, "auto", "tools.jsonl:7")
    assert str(e.value).startswith("tools.jsonl:7: ") and "\n" not in str(e.value)


@pytest.mark.unit
def test_calls_are_read_back_out_of_a_reply():
    text, calls = parse_calls(
        'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Quenmar"}}</tool_call>'
    )
    assert text == "Let me look." and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Quenmar"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    # not a call: left in the text
    assert parse_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Quenmar"}


# ---------------------------------------------------------------- a tiny model fine-tuned to call a tool, served

CITIES = {"Quenmar": "rain", "Ostrel": "snow", "Amberlin": "sun", "Carrow": "fog"}


def tool_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        city, weather = list(CITIES.items())[i % len(CITIES)]
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        out.append(
            {
                "tools": TOOLS,
                "messages": [
                    {"role": "user", "content": f"What is the weather in {city}?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"call_{i}", "content": weather},
                    {"role": "assistant", "content": f"It is {weather} in {city}."},
                ],
            }
        )
    return out


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, gpt2_dir):
    import tiny
    from helpers import run_cli
    from test_serve import _server

    tmp = tmp_path_factory.mktemp("tools")
    data = tiny.write_jsonl(tmp / "tools.jsonl", tool_records(32))
    cfg = tmp / "tools.yaml"
    cfg.write_text(
        f"model: {{path: {gpt2_dir}}}\ndata: {{train: {data}, max_seq_len: 384}}\n"
        "train: {max_steps: 240, micro_batch_size: 4, lr: 5.0e-3, warmup_steps: 2}\n"
        "engine: {precision: fp32}\ntrack: {wandb: disabled, sample_prompts: []}\n"
    )
    r = run_cli("train", str(cfg), f"output.dir={tmp / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    with _server(tmp / "out" / "final", "--name", "tools") as base:
        yield base


def test_the_server_answers_with_tool_calls_through_the_openai_client(tool_server):
    import openai

    client = openai.OpenAI(base_url=f"{tool_server}/v1", api_key="none", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is the weather in Ostrel?"}]
    res = client.chat.completions.create(
        model="tools", messages=ask, tools=TOOLS, temperature=0, max_tokens=60
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Ostrel"}
    # the call and its result sent back: the model answers from the result
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "snow"},
    ]
    res = client.chat.completions.create(
        model="tools", messages=follow, tools=TOOLS, temperature=0, max_tokens=20
    )
    assert (
        res.choices[0].message.content == "It is snow in Ostrel." and res.choices[0].finish_reason == "stop"
    )
    # tool_choice none: the reply is text, not parsed
    res = client.chat.completions.create(
        model="tools", messages=ask, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60
    )
    assert res.choices[0].message.tool_calls is None and "<tool_call>" in (
        res.choices[0].message.content or ""
    )
    # refused with a 400 naming the field: a result for a call never made, streaming with tools
    bad = [*follow[:2], {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="tool result for call id 'call_nope'"):
        client.chat.completions.create(model="tools", messages=bad, tools=TOOLS, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="stream with tools is not supported"):
        client.chat.completions.create(model="tools", messages=ask, tools=TOOLS, stream=True, max_tokens=5)


@pytest.mark.unit
def test_a_template_that_cannot_render_tool_calls_is_refused_in_one_line(llama_dir):
    t = load_tokenizer(ModelConfig(path=str(llama_dir)))  # its own template renders content only
    with pytest.raises(
        UserError, match="the chat template does not render tool calls.*model.chat_template: chatml"
    ):
        tokenize_conversation(t, to_conversation(_record(), "auto", "r:1"), "r:1")
