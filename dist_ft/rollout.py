"""Where GRPO's completions come from: one small interface (`sample`, `decode`, `pad_id`), so a server-side
generator (an OpenAI-compatible vLLM with weight sync) can stand beside this one later. `HFGenerate` samples
with transformers' `generate` from the policy the engine holds now: KV cache on, eval mode (no dropout),
stopping at the chat template's end of turn, in the engine's precision (bf16-autocast: under autocast);
under ZeRO-3 every rank steps through the same number of forwards (`synced_gpus`) so the parameter gathers
stay in step. The draws of a batch come from a seed of its own (`grpo.py`: the run's seed, the optimizer
step, the prompts), not from the run's generators: the same prompts at the same step sample alike on any
number of ranks, any ZeRO stage, and after a resume."""

from __future__ import annotations

from typing import Protocol

import torch

from .data.chat import stop_token_ids
from .precision import AUTOCAST
from .prefix import cache_kw, prefill


class Backend(Protocol):
    pad_id: int

    def sample(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, s, seed: int
    ) -> list[list[int]]:
        """`n` completions of every prompt (left-padded rows), prompt by prompt, each cut after its stop
        token; the draws come from `seed` alone."""
        ...

    def decode(self, completions: list[list[int]]) -> list[str]: ...


class HFGenerate:
    def __init__(self, tok, shared: bool = False):
        self.tok, self.pad_id, self.stop, self.shared = tok, tok.pad_token_id, stop_token_ids(tok), shared

    def sample(self, model, input_ids, attention_mask, n, s, seed: int) -> list[list[int]]:
        from transformers import GenerationConfig

        from .adapters import fixed_draws

        module = getattr(model, "module", model)
        dev = model.device
        ids = input_ids.repeat_interleave(n, 0).to(dev)
        att = attention_mask.repeat_interleave(n, 0).to(dev)
        gen = GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0,
            max_new_tokens=s.max_completion_tokens,
            eos_token_id=self.stop,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        was_training = module.training
        module.eval()
        # the precision the engine trains in: bf16-autocast samples under autocast too
        autocast = torch.autocast(
            dev.type, torch.bfloat16, enabled=getattr(model, "precision", "") == AUTOCAST
        )
        try:
            with torch.no_grad(), fixed_draws(seed), autocast:
                # each prompt's keys/values once, repeated to its n rows (`prefix.py`)
                cache = prefill(module, input_ids.to(dev), attention_mask.to(dev), n) if self.shared else None
                out = module.generate(
                    input_ids=ids,
                    attention_mask=att,
                    generation_config=gen,
                    synced_gpus=getattr(model, "zero_stage", 0) == 3,
                    **({cache_kw(module): cache} if cache is not None else {}),
                )
        finally:
            module.train(was_training)
        comps = []
        for row in out[:, ids.shape[1] :].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.stop), len(row))
            comps.append(row[:end])
        return comps

    def decode(self, completions: list[list[int]]) -> list[str]:
        return self.tok.batch_decode(completions, skip_special_tokens=True)
