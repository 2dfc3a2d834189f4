"""fp16 with DeepSpeed's dynamic loss scaling on one GPU: a forced overflow step is skipped, nothing else is.

    python tests/gpu/fp16_overflow.py MODEL_DIR      # prints one line: RESULT {json}

Builds the engine in-process the way train.py does (1-rank NCCL group, dist_ft.engine.Engine.build, precision fp16),
then: normal steps until one is applied (a fresh loss scale of 2^16 may overflow on its own first), one step
whose loss is multiplied by 1e38 (fp16 gradients become inf), and one more normal step. Reports whether each
step was skipped, whether the parameters and the LR moved, and the loss scale; tests/gpu/test_gpu.py asserts.
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny.py, helpers.py

from helpers import free_port  # noqa: E402


def loss_scale(engine):
    opt = engine._ds.optimizer  # DeepSpeed's own object: the test looks inside, the library never does
    for holder in (getattr(opt, "loss_scale_config", None), opt):
        v = getattr(holder, "cur_scale", None)
        if v is not None:
            return float(v)
    return None


def main(model_dir: str) -> dict:
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    import tiny
    import torch

    from dist_ft import dist
    from dist_ft import engine as eng
    from dist_ft.config import Config
    from dist_ft.data.chat import tokenize_conversation
    from dist_ft.data.formats import to_conversation
    from dist_ft.data.packing import collate_packed
    from dist_ft.loss import token_loss_sum
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    env = eng.init_distributed("nccl")
    torch.manual_seed(0)
    # data.train is validated, never read here; warmup makes the LR move on every applied step
    cfg = Config.model_validate(
        {
            "model": {"path": model_dir},
            "data": {"train": "unused.jsonl", "max_seq_len": 256},
            "train": {"micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 50, "schedule": "constant"},
            "engine": {"precision": "fp16", "zero_stage": 0},
        }
    )
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok, torch.float32)  # DeepSpeed casts to fp16 itself, as in train.py
    engine = eng.Engine.build(cfg, model, 100, "fp16")
    examples = [tokenize_conversation(tok, to_conversation(r, "auto", "r"), "r") for r in tiny.toy_chat(8)]
    batch = collate_packed([examples[:4], examples[4:]], 256, tok.pad_token_id)

    def snapshot():
        return [p.detach().clone() for p in engine.module.parameters()]

    def moved(before):
        return any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=False))

    def one_step(mult: float) -> dict:
        before, skipped, lr, scale = snapshot(), engine.skipped_steps, engine.lr, loss_scale(engine)
        loss = token_loss_sum(engine, batch) / batch.n_loss
        engine.backward(loss * mult)
        engine.step()
        return {
            "loss": loss.item(),
            "skipped": engine.skipped_steps - skipped,
            "params_moved": moved(before),
            "lr_before": lr,
            "lr_after": engine.lr,
            "scale_before": scale,
            "scale_after": loss_scale(engine),
            "param_dtype": str(next(engine.module.parameters()).dtype),
        }

    warmup = []
    # the first applied step; natural overflows at a fresh 2^16 scale only lower the scale
    for _ in range(12):
        warmup.append(one_step(1.0))
        if not warmup[-1]["skipped"]:
            break
    forced = one_step(1e38)
    after = one_step(1.0)
    meta = {
        "rank": env.rank,
        "world": env.world_size,
        "backend": torch.distributed.get_backend(),
        "fp16_enabled": bool(engine._ds.fp16_enabled()),
        "optimizer": type(engine._ds.optimizer).__name__,
    }
    engine.close()
    dist.shutdown()
    return {**meta, "warmup": warmup, "forced": forced, "after": after}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
