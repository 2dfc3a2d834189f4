"""Group Relative Policy Optimization: online RL from the policy's own samples, scored by rewards.

Records are `{prompt}` (a string, or messages ending with a user turn) plus any fields the rewards read (e.g.
`answer`). A prompt goes through the chat template with the generation prompt; its record rides in the shard
after it as UTF-8 bytes under the label mask (the shards hold token ids only), so the rewards get every field.

Each step (`rollout`, on every micro-batch of the step before any loss): G completions per prompt
(`grpo.group_size`) are sampled from the policy the engine holds now (`rollout.py`), stopped at the template's
end of turn or `max_completion_tokens`; each reward scores them and the weighted sum is the reward; the
advantage of a completion is its reward minus its group's mean (divided by the group's std unless dr_grpo).
A group stays whole on one rank. The loss per completion token t of completion c is the clipped surrogate
-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) (+ beta x the k3 KL to the reference: with LoRA the model with
its adapters off, else the starting model in a frozen engine of its own, `Engine.frozen`), with rho the
ratio of the policy's token probability to the sampling policy's: 1 on the first pass over a rollout (the
gradient is A grad log p), whose log-probs are kept as the "old" ones for the `grpo.num_iterations` - 1
optimizer steps after it over the same rollouts (the loop's `passes`; no extra forward pass).
Normalization: `grpo` averages each completion's tokens, then the completions;
`dr_grpo` sums tokens / max_completion_tokens; `dapo` sums tokens / all completion tokens of the global batch
(counted over the step's micro-batches and ranks in `rollout`). A batch's loss units are its completions, so
the loop's normalization over ranks and micro-batches is the mean over the global batch's completions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .. import dist, rewards
from .. import rollout as sampling
from ..config import Config, DataConfig
from ..contracts import Batch
from ..data.chat import IGNORE, Example
from ..data.packing import collate_padded, collate_prefixed
from ..data.shards.manifest import SplitStats
from ..errors import UserError
from ..loss import target_logps
from ..task_settings.grpo import GrpoConfig
from . import Item, LossOut, MetricSums, Model, Task
from ._shared import as_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

METRICS = (
    "reward",
    "reward_std",
    "zero_std_groups",
    "advantage_sq",
    "completion_length",
    "clipped",
    "kl",
    "entropy",
)


def prompt_messages(rec: dict, where: str) -> list[dict]:
    p = rec.get("prompt")
    if isinstance(p, str) and p.strip():
        return [{"role": "user", "content": p}]
    ok = isinstance(p, list) and bool(p)
    ok = ok and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in p or [])
    if not ok or not isinstance(p, list) or p[-1].get("role") != "user":
        raise UserError(
            f"{where}: a grpo record needs `prompt`: a non-empty string, or messages "
            "([{role, content}, ...]) ending with a user turn"
        )
    return [{"role": m["role"], "content": m["content"]} for m in p]


def examples(
    rec: dict, where: str, cfg: DataConfig, tok: PreTrainedTokenizerBase, budget: int = 0
) -> tuple[list[Example], SplitStats]:
    """The prompt's tokens (chat template, generation prompt), then the record as UTF-8 bytes (labelled)."""
    msgs = prompt_messages(rec, where)
    enc: Any = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = list(enc["input_ids"])
    if len(ids) + budget > cfg.max_seq_len:
        raise UserError(
            f"{where}: the prompt is {len(ids)} tokens and grpo.max_completion_tokens {budget} more would "
            f"exceed data.max_seq_len {cfg.max_seq_len}; raise data.max_seq_len, lower "
            "grpo.max_completion_tokens, or shorten the prompt"
        )
    blob = list(json.dumps({**rec, "_messages": msgs}, ensure_ascii=False).encode("utf-8"))
    ex = Example(ids + blob, [IGNORE] * len(ids) + blob)
    stats = SplitStats(records=1, examples=1, tokens=len(ids), loss_tokens=0)
    return [ex], stats


def _split(ex: Example) -> tuple[list[int], dict]:
    k = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    return ex.input_ids[:k], json.loads(bytes(ex.input_ids[k:]).decode("utf-8"))


def collate(items: Sequence[Item], seq_len: int, pad_id: int, packing: bool) -> Batch:
    """Prompts, left-padded for generation, and their records (`extra`); no loss until `rollout`."""
    prompts, fields = zip(*(_split(ex) for ex in as_examples(items)), strict=True)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return Batch(
        input_ids=ids,
        targets=torch.full_like(ids, IGNORE),
        loss_index=torch.zeros(0, dtype=torch.long),
        n_tokens=sum(len(p) for p in prompts),
        n_loss=0,
        attention_mask=att,
        extra={"prompts": list(prompts), "fields": list(fields)},
        lengths=tuple(len(p) for p in prompts),
    )


def advantages(r: torch.Tensor, group: int, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage, its group's reward std) per completion: reward minus the group's mean, divided by the
    group's (unbiased) std + 1e-4 where `scaled`; `r` holds whole groups in order."""
    g = r.view(-1, group)
    std = g.std(dim=1, keepdim=True)
    a = g - g.mean(dim=1, keepdim=True)
    if scaled:
        a = a / (std + 1e-4)
    return a.flatten(), std.expand_as(g).flatten()


def sampling_seed(seed: int, step: int, prompts: list[list[int]]) -> int:
    """The seed a batch's completions are drawn from: the run's seed, the optimizer steps taken, the
    prompts."""
    h = hashlib.sha256(json.dumps([seed, step, prompts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def rollout(
    model: Model,
    batches: list[Batch],
    *,
    s: GrpoConfig,
    scorers,
    backend,
    seed: int,
    shared: bool = False,
    reference=None,
) -> list[Batch]:
    """Sample, score and turn the step's prompt batches into training batches (see the module doc); with a
    `reference` engine (full fine-tuning, beta > 0), its log-probs of the completions too."""
    step = getattr(model, "steps_done", 0)
    # a table of them now and then (training only: the loop writes it)
    training = getattr(getattr(model, "module", model), "training", False)
    table = bool(training and s.samples_every and (step + 1) % s.samples_every == 0)
    out = [
        _rolled(model, b, s, scorers, backend, sampling_seed(seed, step, b.extra["prompts"]), table, shared)
        for b in batches
    ]
    if reference is not None:
        with torch.no_grad():
            for b in out:
                b.extra["ref_logps"] = target_logps(reference, b)[0]
    # dapo's normalization: every completion token of the step, over micro-batches and ranks
    tokens, comps = dist.all_sum(sum(int(b.extra["lengths"].sum()) for b in out), sum(b.n_loss for b in out))
    return [replace(b, extra={**b.extra, "tokens_per_completion": tokens / max(comps, 1)}) for b in out]


def _rolled(model, b: Batch, s: GrpoConfig, scorers, backend, seed: int, table: bool, shared: bool) -> Batch:
    padding = b.n_tokens == 0  # a rank with no evaluation rows left: samples in step, scores nothing
    G = s.group_size
    prompts = [p for p in b.extra["prompts"] for _ in range(G)]
    fields = [f for f in b.extra["fields"] for _ in range(G)]
    comps = backend.sample(model, b.input_ids, b.attention_mask, G, s, seed)
    texts = backend.decode(comps)
    lengths = [len(c) for c in comps]
    user = [{k: v for k, v in f.items() if not k.startswith("_")} for f in fields]
    parts = {}
    for spec, score in scorers:
        given = user if spec.kind == "function" else fields
        values = score([f.get("prompt") for f in fields], texts, lengths, given)
        parts[spec.label] = (spec.weight, rewards.checked(spec, values, len(comps)))
    t = training_batch(prompts, comps, parts, G, s.scaled, backend.pad_id, shared)
    if table:
        t.extra["samples"] = [
            {"prompt": f["_messages"][-1]["content"], "completion": c, "reward": r}
            for f, c, r in zip(fields, texts, t.extra["rewards"].tolist(), strict=True)
        ]
    return t.without_loss() if padding else t


def training_batch(
    prompts: list[list[int]],
    comps: list[list[int]],
    parts: dict,
    group: int,
    scaled: bool,
    pad_id: int,
    shared: bool = False,
) -> Batch:
    """One row per completion (loss on the completion's tokens only) after its prompt, which `shared` batches
    hold once per group (`Batch.prefix_ids`) and others repeat in each row, with what the loss reads: each
    reward's values (`parts`: label -> (weight, values)), their weighted sum, the advantages and each loss
    position's completion. `comps` holds whole groups of `group`, in order (`prompts`: one per completion)."""
    total = torch.zeros(len(comps), dtype=torch.float64)
    for weight, values in parts.values():
        total += weight * torch.tensor(values, dtype=torch.float64)
    adv, std = advantages(total, group, scaled)
    if shared:
        t = collate_prefixed(prompts[::group], comps, pad_id)
    else:
        t = collate_padded(
            [Example(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompts, comps, strict=True)], pad_id
        )
    extra = {
        "comp_of_loss": t.loss_index // t.input_ids.shape[1],
        "adv": adv.float(),
        "lengths": torch.tensor([len(c) for c in comps], dtype=torch.long),
        "rewards": total,
        "reward_parts": {k: torch.tensor(v, dtype=torch.float64) for k, (_, v) in parts.items()},
        "group_std": std,
    }
    return replace(t, n_loss=len(comps), extra=extra)


def loss(model: Model, batch: Batch, chunk: int, *, s: GrpoConfig, adapters: bool) -> LossOut:
    """Summed over the batch's completions (see the module doc); metric sums per completion."""
    logp, ent = target_logps(model, batch, entropy=True)
    zero = logp.new_zeros(())
    if batch.n_loss == 0:
        names = METRICS + tuple(f"reward_{k}" for k in batch.extra.get("reward_parts", {}))
        return LossOut(0.0 * logp.sum(), {k: zero.double() for k in names})
    x = batch.extra
    dev = logp.device
    comp = x["comp_of_loss"].to(dev)
    lengths = x["lengths"].to(dev).float()
    adv = x["adv"].to(dev)[comp]
    old = x.get("old_logps")
    if old is None:  # the first pass over a rollout runs the sampling policy: later passes' "old" (μ > 1)
        old = x["old_logps"] = logp.detach()
    old = old.to(dev)
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - s.epsilon, 1 + s.clip_high)
    per_tok = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if s.beta > 0:
        ref = x.get("ref_logps")
        if ref is None:  # LoRA: the reference is the model with its adapters off
            peft_model: Any = getattr(model, "module", model)
            with torch.no_grad(), peft_model.disable_adapter():
                ref, _ = target_logps(model, batch)
        d = ref - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + s.beta * kl
    n = len(lengths)
    per_comp = torch.zeros(n, device=dev).index_add(0, comp, per_tok)
    if s.loss == "grpo":
        total = (per_comp / lengths).sum()
    elif s.loss == "dr_grpo":
        total = per_comp.sum() / s.max_completion_tokens
    else:  # dapo: / (tokens of the global batch) = / (completions x tokens per completion) there
        total = per_comp.sum() / x["tokens_per_completion"]

    def mean_per_comp(v: torch.Tensor) -> torch.Tensor:
        return (torch.zeros(n, device=dev).index_add(0, comp, v.detach().float()) / lengths).sum().double()

    is_clipped = ((ratio < 1 - s.epsilon) & (adv < 0)) | ((ratio > 1 + s.clip_high) & (adv > 0))
    metrics = {
        "reward": x["rewards"].sum().to(dev),
        "reward_std": x["group_std"].sum().to(dev),
        "zero_std_groups": (x["group_std"] == 0).double().sum().to(dev),
        "advantage_sq": (x["adv"].double() ** 2).sum().to(dev),
        "completion_length": lengths.double().sum(),
        "clipped": mean_per_comp(is_clipped),
        "kl": mean_per_comp(kl),
        "entropy": mean_per_comp(ent if ent is not None else torch.zeros_like(logp)),
        **{f"reward_{k}": v.sum().to(dev) for k, v in x["reward_parts"].items()},
    }
    return LossOut(total, metrics)


def eval_metrics(loss_sum: float, n: float, sums: MetricSums) -> dict[str, float]:
    n = max(n, 1)
    return {"val_loss": loss_sum / n, **{f"val_{k}": v / n for k, v in sorted(sums.scalar.items())}}


def configure(task: Task, cfg: Config) -> Task:
    """The `grpo:` settings bound, the rewards imported / loaded, the sampling backend made (refusals here:
    before anything is written)."""
    from ..tokenizer import load_tokenizer

    s = cfg.grpo
    if not s.rewards:
        raise UserError("data.task grpo needs at least one reward in grpo.rewards (e.g. [{kind: numeric}])")
    tok = load_tokenizer(cfg.model)
    scorers = rewards.build(s.rewards, s.max_completion_tokens, rewards.reward_model)
    # prefix tuning's virtual tokens travel as a KV cache of their own: full rows and `generate` there;
    # gradient checkpointing drops the cache in training: the loss takes full rows there
    shared = s.share_prompts and not (cfg.model.peft is not None and cfg.model.peft.method == "prefix")
    backend = sampling.KVSampler(tok) if shared else sampling.HFGenerate(tok)
    shared_loss = shared and not cfg.model.gradient_checkpointing
    return replace(
        task,
        examples=partial(examples, budget=s.max_completion_tokens),
        rollout=partial(
            rollout, s=s, scorers=scorers, backend=backend, seed=cfg.train.seed, shared=shared_loss
        ),
        loss=partial(loss, s=s, adapters=cfg.model.peft is not None),
        live_reference=s.beta > 0 and cfg.model.peft is None,
        passes=s.num_iterations,
    )


TASK = Task(
    name="grpo",
    auto_class="AutoModelForCausalLM",
    examples=examples,
    collate=collate,
    loss=partial(loss, s=GrpoConfig(), adapters=False),
    eval_metrics=eval_metrics,
    packable=False,
    configure=configure,
)
