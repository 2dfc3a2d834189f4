"""The engine's bf16 modes on one CPU rank, as train.py builds them (run by tests/test_precision.py):

    python tests/precision_probe.py MODEL_DIR OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/precision_probe.py MODEL_DIR OUT_DIR zero3

1. Masters from fp32: for bf16 at ZeRO 0, 1, 2 and 3, the optimizer's fp32 masters before any step (`trainable_fp32`)
   and after one AdamW step on a fixed batch, and the same step in fp32 (weights after it).
2. Learning: STEPS steps at lr LR on a fixed batch (loss per step) in fp32, bf16, bf16-autocast, and bf16 with
   masters made from the bf16 weights (DeepSpeed's own behaviour, what dist_ft did before).

3. `zero3` (on the ranks torchrun starts): the masters of bf16 at ZeRO-3 before any step, whole, from rank 0,
   of the model and of a 3-element parameter made after loading (`odd`: padded partitions).

OUT_DIR/result.pt (zero3.pt) holds the tensors and losses; the test asserts."""

import os
import sys
from functools import partial

import torch

from dist_ft import engine as eng
from dist_ft import precision as prec
from dist_ft.config import Config
from dist_ft.model import load_model
from dist_ft.tokenizer import load_tokenizer

LR, STEPS, ROWS, SEQ = 1e-4, 5, 4, 32


def config(model_dir: str, stage: int, precision: str) -> Config:
    return Config.model_validate(
        {
            "model": {"path": model_dir},
            "data": {"train": "unused.jsonl"},
            "train": {
                "lr": LR,
                "warmup_steps": 0,
                "schedule": "constant",
                "weight_decay": 0.0,
                "max_grad_norm": 0.0,
                "micro_batch_size": ROWS,
            },
            "engine": {"zero_stage": stage, "precision": precision},
        }
    )


def build(model_dir: str, stage: int, precision: str):
    cfg = config(model_dir, stage, precision)
    tok = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model, tok, torch.float32, init=partial(eng.zero3_init, cfg, precision), gather=eng.gathered
    )
    return eng.Engine.build(cfg, model, 100, precision), tok


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(3))


def train(model_dir: str, stage: int, precision: str, steps: int) -> tuple[dict, dict, list[float]]:
    engine, tok = build(model_dir, stage, precision)
    before = engine.trainable_fp32()
    x = batch(len(tok))
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=x, labels=x).loss
        losses.append(float(loss))
        engine.backward(loss)
        engine.step()
    after = engine.trainable_fp32()
    engine.close()
    return before, after, losses


def main(model_dir: str, out: str) -> None:
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
        }
    )
    os.environ.setdefault("MASTER_PORT", "29613")
    eng.init_distributed("gloo")
    torch.manual_seed(0)
    res: dict = {}
    init, fp32_after, res["loss_fp32"] = train(model_dir, 0, "fp32", STEPS)
    _, fp32_one, _ = train(model_dir, 0, "fp32", 1)
    res.update(init=init, fp32_one=fp32_one, fp32_after=fp32_after)
    for stage in (0, 1, 2, 3):
        res[f"bf16_before_{stage}"], res[f"bf16_one_{stage}"], _ = train(model_dir, stage, "bf16", 1)
    _, _, res["loss_bf16"] = train(model_dir, 0, "bf16", STEPS)
    _, _, res["loss_autocast"] = train(model_dir, 0, prec.AUTOCAST, STEPS)
    prec.fp32_sources = lambda *a: []  # DeepSpeed's own masters: made from the bf16-rounded weights
    _, _, res["loss_bf16_rounded_masters"] = train(model_dir, 0, "bf16", STEPS)
    torch.save(res, os.path.join(out, "result.pt"))


def zero3(model_dir: str, out: str) -> None:
    eng.init_distributed("gloo")
    engine, _ = build(model_dir, 3, "bf16")
    before = engine.trainable_fp32()  # collective
    engine.close()
    # a parameter made after loading, whose size the 2 ranks do not divide (padded partitions)
    odd = torch.nn.Linear(3, 1, bias=False)
    odd.weight.data = torch.tensor([[0.1, 0.2, 0.3]])
    engine = eng.Engine.build(config(model_dir, 3, "bf16"), odd, 100, "bf16")
    before["odd"] = engine.trainable_fp32()["weight"]
    engine.close()
    if torch.distributed.get_rank() == 0:
        torch.save(before, os.path.join(out, "zero3.pt"))
    # every rank past its last collective before the group goes (gloo's threads abort a process that exits
    # with the group still up: seen once as "terminate called without an active exception" on rank 1)
    torch.distributed.barrier()
    from dist_ft import dist

    dist.shutdown()


if __name__ == "__main__":
    (zero3 if sys.argv[3:] == ["zero3"] else main)(sys.argv[1], sys.argv[2])
