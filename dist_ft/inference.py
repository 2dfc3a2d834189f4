"""Use a trained model: load an exported directory, generate replies (batched, or streamed token by token).

Shared by `dist-ft chat`, `dist-ft serve`, `dist-ft eval` and the demo (through `evaluate.py`, which scores
held-out data) and the sample prompts logged at the end of training, so all of them render the same chat
template and stop on the same end-of-turn token. Nothing here imports the training side (engine, loop,
checkpoints).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .adapters import is_prefix_tuned
from .data.chat import stop_token_ids
from .errors import UserError
from .faults import NONE, Faults


def load(model_dir: str, trust_remote_code: bool = False, adapter: str | None = None):
    """(tokenizer, model in eval mode) of an exported model directory, or of a base model directory with an
    adapter (`adapter`: a PEFT adapter directory such as <output.dir>/final/adapter, whose tokenizer is used).
    An export of prefix tuning (which cannot merge) gets its own final/adapter applied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .adapters import ADAPTER_DIR, apply, needs_applying
    from .model import grow_embeddings

    if not Path(model_dir).is_dir() or not (Path(model_dir) / "config.json").is_file():
        raise UserError(
            f"--model '{model_dir}': not an exported model directory "
            "(expected config.json inside, e.g. runs/demo/final)"
        )
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter '{adapter}': not an adapter directory "
            "(expected adapter_config.json inside, e.g. runs/demo/final/adapter)"
        )
    if adapter is None and needs_applying(Path(model_dir) / ADAPTER_DIR):
        adapter = str(Path(model_dir) / ADAPTER_DIR)
    tok_dir = (
        adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    )
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    auto = AutoModelForSequenceClassification if is_sequence_head(model_dir) else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise UserError(
            f"--model '{model_dir}': tokenizer has no chat template; "
            "export it with dist-ft train (which saves one)"
        )
    if adapter is not None:
        grow_embeddings(model, len(tok))  # the rows the run's tokenizer added, as training made them
        model.generation_config.eos_token_id = stop_token_ids(tok)
        model.generation_config.pad_token_id = tok.pad_token_id
        model = apply(model, adapter)
    return tok, model.eval()


def is_sequence_head(model_dir: str) -> bool:
    """Whether an exported model is a sequence classifier / reward model (from its config's architectures)."""
    import json

    archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _generation_kwargs(model, temperature: float, top_p: float) -> dict:
    """Sampling (temperature 0: greedy) and, for a prefix-tuned model, no KV cache: it enters its virtual
    tokens as a cache, which generate()'s own cache drops (peft 0.21 with transformers 5: the answer would be
    the base model's)."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    return {**sampling, **({"use_cache": False} if is_prefix_tuned(model) else {})}


def generate(
    tok,
    model,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 16,
    progress: bool = False,
    tools: list[dict] | None = None,
) -> list[str]:
    """The assistant's next reply to each conversation (temperature 0: greedy), `batch_size` conversations per
    generate() call (left-padded; one at a time for a prefix-tuned model); `progress` shows a bar. (`stream`
    yields one reply as it is generated.) `tools`: the function definitions every conversation is offered.)"""
    import torch
    from tqdm import tqdm

    kw, stops = _generation_kwargs(model, temperature, top_p), stop_token_ids(tok)
    size = 1 if "use_cache" in kw else max(1, batch_size)
    replies, side = [], tok.padding_side
    bar = tqdm(
        total=len(conversations),
        desc="generate",
        unit=" replies",
        disable=not progress or len(conversations) < 2,
    )
    try:
        tok.padding_side = "left"  # every prompt ends where generation starts
        for i in range(0, len(conversations), size):
            chunk = conversations[i : i + size]
            enc = tok.apply_chat_template(
                chunk,
                tools=tools,
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
                padding=True,
            )
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=stops,
                    **kw,
                )
            width = enc["input_ids"].shape[1]
            replies += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            bar.update(len(chunk))
    finally:
        tok.padding_side = side
        bar.close()
    return replies


@dataclass
class Delta:
    text: str  # text added since the previous delta ("" possible)
    tokens: int  # tokens generated so far (the stop token included)
    # set on the last delta: "stop" (end of turn or a stop string), "length", "cancelled"
    finish: str | None = None


GREEDY_BELOW = 1e-3  # temperatures under this sample greedily (1e-45 would overflow the softmax)


def stream(
    tok,
    model,
    input_ids: list[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    stop: tuple[str, ...] = (),
    cancel: threading.Event | None = None,
    seed: int | None = None,
    faults: Faults = NONE,
) -> Iterator[Delta]:
    """Generate from `input_ids` on a background thread and yield the text as tokens arrive: the deltas
    concatenate to what `generate` returns for the same prompt (the decoded reply, stripped of surrounding
    whitespace), cut before the first of the `stop` strings. Setting `cancel` (the client went away) stops
    generation at the next token. Sampling (temperature >= GREEDY_BELOW; below it, greedy) draws from a
    private torch.Generator seeded with `seed`, or from the OS when None, so a seed repeats its reply and
    never touches the process-global RNG."""
    import queue
    import secrets

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from transformers.generation.streamers import BaseStreamer

    q: queue.Queue = queue.Queue()
    event = cancel or threading.Event()  # (also set here, once a stop string is hit)
    stops, done = stop_token_ids(tok), object()

    class Tokens(BaseStreamer):
        prompt = True

        def put(self, value):
            if self.prompt:  # generate() hands the prompt over first
                self.prompt = False
            else:
                q.put(value.flatten().tolist())
                faults.after_token()

        def end(self):
            pass

    class Cancelled(StoppingCriteria):
        def __call__(self, ids, scores, **kw):
            return torch.full((ids.shape[0],), event.is_set(), dtype=torch.bool, device=ids.device)

    class Sample(LogitsProcessor):
        """generate()'s sampling (temperature, the model's top_k - transformers' default 50 - and top_p),
        drawn from this request's own generator: the drawn token keeps score 0 and every other -inf, so the
        greedy pick takes it."""

        def __init__(self):
            top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
            top_k = 50 if top_k is None else top_k
            self.warpers = [
                TemperatureLogitsWarper(temperature),
                *([TopKLogitsWarper(top_k)] if top_k > 0 else []),
                *([TopPLogitsWarper(top_p)] if top_p < 1 else []),
            ]
            self.rng: torch.Generator | None = None

        def __call__(self, ids, scores):
            if self.rng is None:
                self.rng = torch.Generator(device=scores.device)
                self.rng.manual_seed(secrets.randbits(64) if seed is None else seed % 2**64)
            for warp in self.warpers:
                scores = warp(ids, scores)
            probs = torch.softmax(scores.float(), dim=-1)
            ok = bool(torch.isfinite(probs).all()) and bool((probs.sum(-1) > 0).all())
            pick = torch.multinomial(probs, 1, generator=self.rng) if ok else scores.argmax(-1, keepdim=True)
            return torch.full_like(scores, -math.inf).scatter_(1, pick, 0.0)

    def work():
        try:
            with torch.no_grad():
                ids = torch.tensor([input_ids])
                sampled = (
                    {"logits_processor": LogitsProcessorList([Sample()])}
                    if temperature >= GREEDY_BELOW
                    else {}
                )
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    streamer=Tokens(),
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    **_generation_kwargs(model, 0.0, top_p),
                    **sampled,
                )
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put(e)
        finally:
            q.put(done)

    def reply_so_far() -> tuple[str, bool]:
        """The decoded reply, cut before the first stop string, stripped; and whether a stop string cut it."""
        text = tok.decode(ids, skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
        return (text[:hit] if hit >= 0 else text).strip(), hit >= 0

    threading.Thread(target=work, daemon=True).start()
    ids: list[int] = []
    sent, cut = "", False
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        ids += item
        body, hit = reply_so_far()
        if hit:
            cut = True
            event.set()
        # (a multi-byte character may be incomplete)
        if body.startswith(sent) and not body.endswith("\ufffd"):
            yield Delta(body[len(sent) :], len(ids))
            sent = body
    body, _ = reply_so_far()
    finish = (
        "stop"
        if cut or (ids and ids[-1] in stops)
        else "cancelled"
        if event.is_set()
        else "length"
        if len(ids) >= max_new_tokens
        else "stop"
    )
    yield Delta(body[len(sent) :] if body.startswith(sent) else "", len(ids), finish)
