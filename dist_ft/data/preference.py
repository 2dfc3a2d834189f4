"""Preference records -> (prompt, chosen, rejected) message lists, for the pairwise tasks (DPO, reward
models).

Accepted shapes (each completion a string or a list holding one assistant message):
- `{prompt, chosen, rejected}`: `prompt` a string (one user turn) or OpenAI messages ending with a user turn;
- `{conversations, chosen, rejected}`: ShareGPT (from/value) prompt; completions strings or {from, value}
  messages;
- `{chosen: [whole conversation], rejected: [whole conversation]}`: the same messages up to a last, differing,
  assistant turn (the shared prefix is the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .chat import IGNORE, Example, end_of_turn_id, tokenize_conversation
from .formats import SHAREGPT_ROLES, Conversation, _check_roles, json_type, message_list


@dataclass
class Pair:
    prompt: list[dict]  # ends with a user turn
    chosen: dict  # one assistant message
    rejected: dict


def _completion(v, where: str, key: str, sharegpt: bool) -> dict:
    if isinstance(v, str):
        if not v.strip():
            raise UserError(
                f"{where}: the {key} completion is empty, so there is nothing to compare; write it or remove "
                "the record"
            )
        return {"role": "assistant", "content": v}
    if isinstance(v, dict):
        v = [v]
    rk, ck, roles = (
        ("from", "value", SHAREGPT_ROLES)
        if sharegpt and v and isinstance(v[0], dict) and "from" in v[0]
        else ("role", "content", None)
    )
    msgs = message_list(v, where, key, rk, ck, roles) if isinstance(v, list) else None
    if msgs is None:
        raise UserError(
            f"{where}: '{key}' must be a string or an assistant message, got JSON {json_type(v)}; give the "
            "reply text"
        )
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise UserError(
            f"{where}: '{key}' must be one assistant reply, got {len(msgs)} message(s) with roles "
            f"{', '.join(m['role'] for m in msgs)}; put earlier turns in 'prompt'"
        )
    return msgs[0]


def _prompt(rec: dict, where: str) -> tuple[list[dict], bool]:
    if "conversations" in rec:
        return message_list(
            rec["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES
        ), True
    p = rec["prompt"]
    if isinstance(p, str):
        if not p.strip():
            raise UserError(f"{where}: 'prompt' is empty; give the user's message")
        return [{"role": "user", "content": p}], False
    return message_list(p, where, "prompt", "role", "content", None), False


def _check_prompt(msgs: list[dict], where: str) -> None:
    if not msgs or msgs[-1]["role"] != "user":
        raise UserError(
            f"{where}: the prompt must end with a user turn (it ends with "
            f"{msgs[-1]['role'] if msgs else 'nothing'}); the completions answer it"
        )
    _check_roles(msgs + [{"role": "assistant", "content": "x"}], where)


def to_pair(rec: dict, where: str) -> Pair:
    """One preference record -> Pair, or a one-line UserError naming the record and the fix."""
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise UserError(
            f"{where}: preference record lacks '{missing[0]}' (keys: {', '.join(sorted(rec)) or 'none'}); "
            "give {prompt, chosen, rejected}, {conversations, chosen, rejected} or "
            "{chosen: [...], rejected: [...]}"
        )
    if "prompt" in rec or "conversations" in rec:
        prompt, sharegpt = _prompt(rec, where)
        chosen, rejected = (_completion(rec[k], where, k, sharegpt) for k in ("chosen", "rejected"))
    else:  # two whole conversations sharing everything but their last (assistant) message
        if not (isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list)):
            raise UserError(
                f"{where}: without 'prompt', 'chosen' and 'rejected' must be whole conversations (message "
                f"lists), got JSON {json_type(rec['chosen'])} and {json_type(rec['rejected'])}; or add "
                "'prompt'"
            )
        c, r = (message_list(rec[k], where, k, "role", "content", None) for k in ("chosen", "rejected"))
        prompt = c[:-1]
        # their lengths may differ (refused below): compare the turns both have
        for i, (a, b) in enumerate(zip(c[:-1], r[:-1], strict=False)):
            if a != b:
                raise UserError(
                    f"{where}: 'chosen' and 'rejected' differ at message {i}, before their last message; "
                    "they must share the prompt turns and differ only in the final assistant reply"
                )
        if len(c) != len(r):
            raise UserError(
                f"{where}: 'chosen' has {len(c)} messages and 'rejected' {len(r)}; they must share the "
                "prompt turns and differ only in the final assistant reply"
            )
        chosen, rejected = (_completion(m[-1:], where, k, False) for m, k in ((c, "chosen"), (r, "rejected")))
    _check_prompt(prompt, where)
    return Pair(prompt, chosen, rejected)


def _prompt_ids(tok, prompt: list[dict]) -> list[int]:
    return list(
        tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )


def tokenize_pair(tok, pair: Pair, where: str) -> tuple[Example, Example]:
    """Chosen and rejected as whole sequences (prompt + completion, the same template as SFT) whose labels are
    the completion's tokens only. Refused, naming the record: prompt + completion whose first tokens are not
    the prompt's own (a merge across the prompt/completion boundary), a doubled leading BOS or a BOS in the
    completion, an empty completion, a completion without exactly one end-of-turn token at its end (a
    duplicated EOS, or a marker in the text), and a pair whose chosen and rejected sequences are the same
    tokens (however the records' text or shape differ)."""
    prompt, eot = _prompt_ids(tok, pair.prompt), end_of_turn_id(tok)
    # a template without an end-of-turn marker has none to check
    n_prompt, special = len(prompt), set(tok.all_special_ids)
    out = []
    for key, msg in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        whole = list(
            tok.apply_chat_template(pair.prompt + [msg], tokenize=True, return_dict=True)["input_ids"]
        )
        if whole[:n_prompt] != prompt:
            # the first differing token within both (`whole` may end inside the prompt)
            at = next((i for i, (a, b) in enumerate(zip(whole, prompt, strict=False)) if a != b), len(whole))
            raise UserError(
                f"{where}: the prompt's tokens differ between the prompt alone and prompt + {key} (first at "
                f"token {at}: the tokenizer merges the prompt's end with the reply); start the reply so the "
                "prompt tokenizes alike"
            )
        ex = tokenize_conversation(tok, Conversation(pair.prompt + [msg]), where)
        labels = [IGNORE] * n_prompt + ex.labels[n_prompt:]
        done = [t for t in labels if t != IGNORE]
        # (a template may write it at every turn, as ChatML models whose BOS is <|im_start|> do)
        bos = tok.bos_token_id
        if bos is not None and bos != tok.eos_token_id and (ex.input_ids[:2] == [bos, bos] or bos in done):
            what = "starts with two BOS tokens" if ex.input_ids[:2] == [bos, bos] else "holds a BOS token"
            raise UserError(
                f"{where}: the {key} sequence {what} {tok.bos_token!r} beyond the template's (doubled by the "
                "tokenizer, or written in the text); remove the BOS from the text or the template"
            )
        if not done:
            raise UserError(f"{where}: the {key} completion has no token after the prompt; write the reply")
        if eot is not None and eot in special and (done.count(eot) != 1 or done[-1] != eot):
            raise UserError(
                f"{where}: the {key} completion holds {done.count(eot)} end-of-turn token(s) "
                f"{tok.convert_ids_to_tokens(eot)!r} (exactly one, at its end, is expected); remove "
                "end-of-turn or EOS markers from the reply text"
            )
        out.append(Example(ex.input_ids, labels))
    # no preference to learn (a DPO margin / reward gap of zero): a broken export
    if out[0].input_ids == out[1].input_ids:
        raise UserError(
            f"{where}: 'chosen' and 'rejected' render to the same {len(out[0].input_ids)} tokens, so the "
            "pair prefers nothing; make the rejected reply differ, or remove the record"
        )
    return out[0], out[1]
