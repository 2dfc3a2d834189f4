"""The chat template, in one place: our ChatML template for base models, where an assistant turn ends
(the end-of-turn token generation stops at), and conversation -> token ids + labels (-100 everywhere
except assistant turns and their end-of-turn token).

Uses `apply_chat_template(..., return_assistant_tokens_mask=True)` when the template has
`{% generation %}` markers; otherwise derives the assistant character spans by rendering message
prefixes and maps them to tokens through the fast tokenizer's offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .formats import Conversation

IGNORE = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# With `tools`: a system turn lists them (after the conversation's own system message) and says how to call
# one; an assistant's calls follow its content as <tool_call>{"name", "arguments"}</tool_call> (inside the
# generation markers: they carry loss), results are `tool` turns (no loss). Without tools it renders as
# before.
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call these functions:\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\n' + (tool['function'] if tool['function'] is defined else tool) | tojson }}{%- endfor %}"
    '{{- \'\n</tools>\n\nTo call one, reply with <tool_call>{"name": <function name>, "arguments": '
    "<JSON object>}</tool_call><|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] }}"
    "{%- for call in (message['tool_calls'] or []) if message['tool_calls'] is defined %}"
    "{{- '<tool_call>' + {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss (unshifted: label i is token i)
    ref: float | None = (
        None  # pairwise tasks: the reference model's summed log-prob of the labelled tokens, once computed
    )

    @property
    def n_loss(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def install_chatml(tok) -> None:
    """Give a tokenizer our ChatML template and its two special tokens (the model's embeddings grow to
    match)."""
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = CHATML_TEMPLATE


def template_text(tok) -> str:
    """The chat template a conversation is rendered with: the one named `default` where a tokenizer has
    several (as `apply_chat_template` picks it; the tokenizer's loader refuses several without a default)."""
    t = tok.chat_template or ""
    return t.get("default", "") if isinstance(t, dict) else t


def has_generation_markers(tok) -> bool:
    return "{% generation %}" in template_text(tok) or "{%- generation %}" in template_text(tok)


def _render(tok, msgs, gen_prompt: bool, tools: list[dict] | None = None) -> str:
    return tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen_prompt)


def assistant_char_spans(
    tok, msgs: list[dict], where: str, tools: list[dict] | None = None, turns: set[int] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the [start, end) character span of each assistant turn (incl. end-of-turn);
    `turns`: of those messages only."""
    full = _render(tok, msgs, False, tools)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or (turns is not None and i not in turns):
            continue
        prefix = _render(tok, msgs[:i], True, tools)
        upto = _render(tok, msgs[: i + 1], False, tools)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise UserError(
                f"{where}: the chat template renders message prefixes inconsistently, so assistant tokens "
                "cannot be located; use a template with {% generation %} markers (model.chat_template: "
                "chatml)"
            )
        end = len(upto.rstrip())  # the end-of-turn token is kept, the newline after it is not
        spans.append((len(prefix), end))
    return full, spans


def end_of_turn_id(tok) -> int | None:
    """Token that closes an assistant turn in the tokenizer's template (e.g. <|im_end|>): generation stops
    there."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        full, spans = assistant_char_spans(tok, msgs, "chat template probe")
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: fall back to EOS
        return tok.eos_token_id
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    inside = [
        t
        for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if spans[0][0] <= a < spans[0][1]
    ]
    return inside[-1] if inside else tok.eos_token_id


def stop_token_ids(tok) -> list[int]:
    """Ids that end a reply: the template's end-of-turn token, then EOS (deduplicated)."""
    return [i for i in dict.fromkeys([end_of_turn_id(tok), tok.eos_token_id]) if i is not None]


def trained_turns(conv: Conversation, train_on: str, where: str) -> set[int]:
    """The assistant messages that carry loss: every one (`all_assistant`) or the last (`last_assistant`),
    less those marked `"train": false`."""
    turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    kept = {i for i in turns if conv.trained is None or conv.trained[i]}
    if not kept:
        raise UserError(
            f'{where}: no assistant turn of this conversation carries loss ("train": false'
            + (" on its last one, and data.train_on: last_assistant" if train_on == "last_assistant" else "")
            + "); train one of its turns or remove the record"
        )
    return kept


def _check_renders_calls(tok, conv: Conversation, where: str) -> None:
    """A template that cannot render tool calls fails here in one line (it would raise from jinja, or drop
    the calls silently)."""
    names = [c["function"]["name"] for m in conv.messages for c in m.get("tool_calls") or ()]
    if not names:
        return
    try:
        text = _render(tok, conv.messages, False, conv.tools)
    except Exception:  # noqa: BLE001 - jinja's TypeError / UndefinedError on a message it cannot render
        text = ""
    if not all(n in text for n in names):
        raise UserError(
            f"{where}: the chat template does not render tool calls (the call to '{names[0]}' is not in its "
            "output); set model.chat_template: chatml, or use a template that renders `tool_calls`"
        )


def tokenize_conversation(tok, conv: Conversation, where: str, train_on: str = "all_assistant") -> Example:
    _check_renders_calls(tok, conv, where)
    turns = trained_turns(conv, train_on, where)
    every = len(turns) == sum(m["role"] == "assistant" for m in conv.messages)
    if every and has_generation_markers(tok):
        enc = tok.apply_chat_template(
            conv.messages,
            tools=conv.tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"])
    else:
        full, spans = assistant_char_spans(tok, conv.messages, where, conv.tools, turns)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    if not any(m for m in mask):
        raise UserError(
            f"{where}: the chat template produced no assistant tokens for this conversation; "
            "check the template (model.chat_template) or the record"
        )
    return Example(ids, labels)


def tokenize_text(tok, text: str, max_len: int) -> list[Example]:
    """Raw text for continued pretraining: loss on every token, EOS appended, split into max_len chunks."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    return [
        Example(ids[i : i + max_len], ids[i : i + max_len])
        for i in range(0, len(ids), max_len)
        if len(ids[i : i + max_len]) > 1
    ]
