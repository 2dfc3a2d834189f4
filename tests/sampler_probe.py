"""GRPO's sampler at ZeRO-3 on the ranks torchrun starts (run by tests/test_grpo.py):

    python -m torch.distributed.run --nproc_per_node 2 tests/sampler_probe.py MODEL_DIR OUT_DIR

Each rank samples its own prompt from a real ZeRO-3 engine (each rank holds half of every parameter, gathered
forward by forward). Rank 0's stop token is the first token its rows draw, so they end at once; rank 1's rows
run to max_completion_tokens: rank 0 must keep stepping (its gathers are rank 1's too) until rank 1 is done.
OUT_DIR/rank<r>.json: the completions and the number of forwards the rank ran; the test compares them with
one process sampling without DeepSpeed."""

import json
import os
import sys
from functools import partial

import torch

from dist_ft import dist
from dist_ft import engine as eng
from dist_ft.config import Config
from dist_ft.model import load_model
from dist_ft.rollout import KVSampler
from dist_ft.task_settings.grpo import GrpoConfig, RewardSpec
from dist_ft.tokenizer import load_tokenizer

PROMPTS = [[5, 17, 9, 40], [30, 4, 8]]
SETTINGS = GrpoConfig(max_completion_tokens=10, group_size=2, rewards=[RewardSpec(kind="length")])
N, SEED = 2, 7


def sample(model, tok, prompt: list[int], stop: set[int] | None):
    """(completions, forwards) of `prompt` sampled N times; `stop`: the sampler's stop tokens (None: the
    template's)."""
    sampler = KVSampler(tok)
    if stop is not None:
        sampler.stop = stop
    module = getattr(model, "module", model)
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        comps = sampler.sample(
            model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), N, SETTINGS, SEED
        )
    finally:
        handle.remove()
    return comps, len(calls)


def main(model_dir: str, out: str) -> None:
    eng.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    cfg = Config.model_validate(
        {
            "model": {"path": model_dir},
            "data": {"train": "unused.jsonl"},
            "engine": {"zero_stage": 3, "precision": "fp32"},
        }
    )
    tok = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model, tok, torch.float32, init=partial(eng.zero3_init, cfg, "fp32"), gather=eng.gathered
    )
    engine = eng.Engine.build(cfg, model, 100, "fp32")
    stop = {int(t) for t in sys.argv[3].split(",")} if rank == 0 else set()
    comps, forwards = sample(engine, tok, PROMPTS[rank], stop)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"completions": comps, "forwards": forwards}, f)
    engine.close()
    torch.distributed.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])  # (argv[3]: rank 0's stop tokens, comma-separated)
