"""What the engine's optimizer does with gradients and weight decay, on 2 CPU ranks (gloo), as train.py builds it:

    python -m deepspeed.launcher.runner --num_gpus 2 tests/engine_numerics.py MODEL_DIR OUT_DIR

1. bf16 gradient sums. A 1x3 weight `w` and loss `sum(w * x)`, so a micro-batch's gradient is its `x` (exact in
   bf16: powers of two). 16 micro-batches per step (grad_accum 16) on each rank, chosen so that a sum in bf16 loses
   what fp32 keeps: element 0, one 1.0 then fifteen 2^-9 (each below half a bf16 step of 1); element 1, +-1
   alternating on rank 0 against 2^-9 on rank 1 (each per-micro-batch reduction in bf16 rounds 1 + 2^-9 back to
   1); element 2, 1 on rank 0 and 2^-9 on rank 1 in the first micro-batch (one reduction). At ZeRO 1, 2 and 3, in
   bf16 and in fp32: the whole gradient at the step boundary (`safe_get_full_grad`) and the engine's grad norm.
2. Weight decay. The test's tiny GPT-2 loaded as train.py does (under ZeRO-3 through `zero.Init`, whose
   parameters are 1-D placeholders), weight_decay 0.5, 4 AdamW steps on fixed rows (each rank its half of the
   global batch): the final fp32 weights at ZeRO-3 and ZeRO-0, the optimizer's group names and weight decays, and
   where `apply_optimizer_settings` (resume) puts a changed weight decay.

Rank 0 writes OUT_DIR/result.json and OUT_DIR/weights-zero{0,3}.pt; tests/test_engine_numerics.py asserts.
"""

import json
import sys
from functools import partial
from pathlib import Path

import torch

from dist_ft import engine as eng
from dist_ft.config import Config
from dist_ft.model import load_model
from dist_ft.tokenizer import load_tokenizer

ACCUM, K = 16, 3
SMALL = 2.0**-9
WD, LR, STEPS, ROWS, SEQ = 0.5, 1e-2, 4, 4, 16
# GPT-2's key bias has a zero gradient (softmax ignores it): only rounding noise, which Adam with eps 1e-8 turns into
# lr-sized steps that differ between 2 ranks and 1 process; eps 1e-6 keeps that noise far below the tolerance
EPS = 1e-6


def micro_x(m: int, rank: int) -> list[float]:
    """The gradient micro-batch `m` contributes on `rank` (before DeepSpeed's 1/grad_accum and 1/world scaling)."""
    e0 = 1.0 if m == 0 else SMALL
    e1 = (1.0 if m % 2 == 0 else -1.0) if rank == 0 else SMALL
    e2 = (1.0 if rank == 0 else SMALL) if m == 0 else 0.0
    return [e0, e1, e2]


class Dot(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, K))

    def forward(self, x):
        return (self.w * x.to(self.w.dtype)).sum()


def config(model_dir: str, stage: int, precision: str, **train) -> Config:
    return Config.model_validate(
        {
            "model": {"path": model_dir},
            "data": {"train": "unused.jsonl"},  # validated, never read
            "train": {"max_grad_norm": 0.0, **train},
            "engine": {"zero_stage": stage, "precision": precision},
        }
    )


def grad_sums(model_dir: str, rank: int, stage: int, precision: str) -> dict:
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    engine = eng.Engine.build(
        config(model_dir, stage, precision, grad_accum=ACCUM, micro_batch_size=1), Dot(), 10, precision
    )
    for m in range(ACCUM):
        engine.backward(engine(x=torch.tensor([micro_x(m, rank)])))
        if m == ACCUM - 1:
            grad = safe_get_full_grad(engine.module.w)  # every rank: it gathers / reduces
        norm = engine.step()
    out = {
        "grad": grad.float().flatten().tolist(),
        "norm": norm,
        "optimizer": type(engine._ds.optimizer).__name__,
    }
    engine.close()
    return out


def rows(rank: int, world: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (STEPS, ROWS, SEQ), generator=g)
    per = ROWS // world
    return ids[:, rank * per : (rank + 1) * per]


def decayed_run(model_dir: str, rank: int, world: int, stage: int, out: Path) -> dict:
    cfg = config(
        model_dir,
        stage,
        "fp32",
        micro_batch_size=ROWS // world,
        lr=LR,
        eps=EPS,
        weight_decay=WD,
        schedule="constant",
    )
    tok = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model, tok, torch.float32, init=partial(eng.zero3_init, cfg, "fp32"), gather=eng.gathered
    )
    placeholders = sorted({tuple(p.shape) for p in model.parameters()}) if stage == 3 else None
    engine = eng.Engine.build(cfg, model, STEPS, "fp32")
    for ids in rows(rank, world, len(tok)):
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        engine.step()
    weights = engine.trainable_fp32()
    groups = {
        n: {"weight_decay": g["weight_decay"], "n_params": len(g["params"])}
        for n, g in zip(engine.group_names, engine._groups(), strict=False)
    }
    # as a resumed run with a changed weight decay
    engine.apply_optimizer_settings(LR, cfg.train.betas, cfg.train.eps, 0.25)
    resumed = {n: g["weight_decay"] for n, g in zip(engine.group_names, engine._groups(), strict=False)}
    engine.close()
    if rank == 0:
        torch.save(weights, out / f"weights-zero{stage}.pt")
    return {"groups": groups, "resumed": resumed, "placeholder_shapes": placeholders}


def main(model_dir: str, out: Path) -> None:
    env = eng.init_distributed("gloo")
    result = {"world": env.world_size, "grads": {}, "decay": {}}
    for stage in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            result["grads"][f"{stage}-{precision}"] = grad_sums(model_dir, env.rank, stage, precision)
    for stage in (3, 0):
        result["decay"][stage] = decayed_run(model_dir, env.rank, env.world_size, stage, out)
    if env.rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    from dist_ft import dist

    dist.shutdown()


if __name__ == "__main__":
    # the deepspeed launcher adds it
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    main(args[0], Path(args[1]))
