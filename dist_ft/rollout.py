"""Where GRPO's completions come from: one small interface (`sample`, `decode`, `pad_id`), so a server-side
generator (an OpenAI-compatible vLLM with weight sync) can stand beside these later. Both sample from the
policy the engine holds now: KV cache on, eval mode (no dropout), stopping at the chat template's end of
turn, in the engine's precision (bf16-autocast: under autocast); under ZeRO-3 every rank steps through the
same number of forwards, so the parameter gathers stay in step. The draws of a batch come from a seed of its
own (`grpo.py`: the run's seed, the optimizer step, the prompts), not from the run's generators: the same
prompts at the same step sample alike on any number of ranks, any ZeRO stage, and after a resume.

`KVSampler` (the default, `grpo.share_prompts`) is a decoding loop of our own, for what transformers'
`generate` spends time on that GRPO does not need (bench/grpo.py, 32 rows x 32 tokens of SmolLM2-135M on 2
CPU cores): each prompt's keys/values are computed once and repeated to its G rows, not computed G times;
a token is drawn from one uniform per row by inverse CDF, where `generate`'s `torch.multinomial` draws an
exponential per vocabulary entry (36 ms a step for 32 rows of a 49k vocabulary, a quarter of the decoding
time); rows that reached their end of turn leave the batch. `HFGenerate` is `generate` itself: prefix
tuning (whose virtual tokens travel as a KV cache of their own) and `grpo.share_prompts: false` use it."""

from __future__ import annotations

from typing import Protocol

import torch

from . import dist
from .data.chat import stop_token_ids
from .precision import AUTOCAST
from .prefix import cache_kw, cache_of


class Backend(Protocol):
    pad_id: int

    def sample(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, s, seed: int
    ) -> list[list[int]]:
        """`n` completions of every prompt (left-padded rows), prompt by prompt, each cut after its stop
        token; the draws come from `seed` alone."""
        ...

    def decode(self, completions: list[list[int]]) -> list[str]: ...


def draw(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """The token each row's uniform `u` (in [0, 1)) picks from softmax(logits / temperature), by inverse
    CDF; with `top_p` < 1 from the nucleus only (the most probable tokens until their mass reaches top_p,
    the one that reaches it included)."""
    p = torch.softmax(logits.float() / temperature, dim=-1).double()
    order = None
    if top_p < 1:
        p, order = p.sort(dim=-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
    c = p.cumsum(-1)
    idx = torch.searchsorted(c, (u.double() * c[:, -1])[:, None], right=True).squeeze(1)
    # (rounding can put u x total on the total: the last token with any probability then)
    last = p.shape[-1] - 1 - (p > 0).flip(-1).int().argmax(-1)
    idx = torch.minimum(idx, last)
    return idx if order is None else order.gather(1, idx[:, None]).squeeze(1)


class _Sampling:
    """What both backends share: eval mode, no grad, the draws' seed and the engine's precision around a
    `run(module, dev, zero3)`."""

    def __init__(self, tok):
        self.tok, self.pad_id, self.stop = tok, tok.pad_token_id, set(stop_token_ids(tok))

    def _around(self, model, seed: int, run):
        from .adapters import fixed_draws

        module = getattr(model, "module", model)
        dev = model.device
        was_training = module.training
        module.eval()
        # the precision the engine trains in: bf16-autocast samples under autocast too
        autocast = torch.autocast(
            dev.type, torch.bfloat16, enabled=getattr(model, "precision", "") == AUTOCAST
        )
        try:
            with torch.no_grad(), fixed_draws(seed), autocast:
                return run(module, dev, getattr(model, "zero_stage", 0) == 3)
        finally:
            module.train(was_training)

    def decode(self, completions: list[list[int]]) -> list[str]:
        return self.tok.batch_decode(completions, skip_special_tokens=True)


class KVSampler(_Sampling):
    def sample(self, model, input_ids, attention_mask, n, s, seed: int) -> list[list[int]]:
        def run(module, dev, zero3: bool) -> list[list[int]]:
            cache_name = cache_kw(module)
            att = attention_mask.to(dev, torch.long)
            pos = (att.cumsum(1) - 1).clamp(min=0)
            out = module(input_ids=input_ids.to(dev), attention_mask=att, position_ids=pos, use_cache=True)
            cache = cache_of(out)
            cache.batch_repeat_interleave(n)  # each prompt's keys/values, once, for its n rows
            logits = out.logits[:, -1].repeat_interleave(n, 0)
            mask, nxt = att.repeat_interleave(n, 0), pos[:, -1].repeat_interleave(n) + 1
            comps: list[list[int]] = [[] for _ in range(len(mask))]
            live, done = list(range(len(mask))), False
            for t in range(s.max_completion_tokens):
                tok = draw(logits, s.temperature, s.top_p, torch.rand(len(logits), device=dev))
                keep = []
                if not done:
                    for i, x in enumerate(tok.tolist()):
                        comps[live[i]].append(x)
                        if x not in self.stop:
                            keep.append(i)
                    done = not keep
                if t == s.max_completion_tokens - 1:
                    break
                # under ZeRO-3 a rank whose rows all ended steps on (one idle row) until every rank's have
                if (dist.all_sum(0 if done else 1)[0] == 0) if zero3 else done:
                    break
                if done:
                    keep = [0]
                if len(keep) < len(live):
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    mask, nxt, tok = mask[idx], nxt[idx], tok[idx]
                    live = [live[i] for i in keep]
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
                out = module(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=nxt[:, None],
                    use_cache=True,
                    **{cache_name: cache},
                )
                cache, logits, nxt = cache_of(out), out.logits[:, -1], nxt + 1
            return comps

        return self._around(model, seed, run)


class HFGenerate(_Sampling):
    def sample(self, model, input_ids, attention_mask, n, s, seed: int) -> list[list[int]]:
        from transformers import GenerationConfig

        gen = GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0,
            max_new_tokens=s.max_completion_tokens,
            eos_token_id=sorted(self.stop),
            pad_token_id=self.pad_id,
            use_cache=True,
        )

        def run(module, dev, zero3: bool) -> list[list[int]]:
            ids = input_ids.repeat_interleave(n, 0).to(dev)
            att = attention_mask.repeat_interleave(n, 0).to(dev)
            out = module.generate(input_ids=ids, attention_mask=att, generation_config=gen, synced_gpus=zero3)
            comps = []
            for row in out[:, ids.shape[1] :].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in self.stop), len(row))
                comps.append(row[:end])
            return comps

        return self._around(model, seed, run)
