"""Sequence parallelism (engine.sequence_parallel, DeepSpeed's Ulysses attention) on CPU ranks over gloo.

Equivalence: sp=2 on 2 ranks trains like sp=1 on 1 rank on the same rows (GPT-2 and Llama tiny models, ZeRO-0
and ZeRO-3, validation included, packed and unpacked), dp=2 x sp=2 on 4 ranks like dp=2 on 2 ranks, and a SIGKILL + resume at sp=2
is bit-identical. Tolerance 2e-5 on losses, as tests/test_distributed.py: the all-to-alls and the gradient sums
over ranks add in another order than one process does (fp32 rounding); the data, the positions, the label shift
and the loss normalization are the same. Weights: at most 1e-4 apart and 1e-7 on average - Adam divides by the
gradient's own scale, so for a weight whose gradient is near zero a rounding-level difference becomes a visible
one (measured: 1 weight of 168,384 at 2.5e-5 for dp2 x sp2, all others below 1e-5; mean 5e-9).
"""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import assert_identical_runs, metric_records, run_cmd, train_cmd
from safetensors.torch import load_file

from dist_ft import sequence_parallel as seqp
from dist_ft.config import Config
from dist_ft.contracts import Batch
from dist_ft.data.packing import collate_padded
from dist_ft.errors import UserError

TOL = 2e-5

# ---------------------------------------------------------------- the data side


def _padded(lengths: list[int]) -> Batch:
    from dist_ft.data.chat import Example

    exs = [Example(list(range(1, n + 1)), [-100] * 2 + list(range(3, n + 1))) for n in lengths]
    return collate_padded(exs, pad_id=0)


@pytest.mark.unit
@pytest.mark.parametrize("sp", [2, 3])
def test_shards_put_back_together_are_the_batch(sp):
    b = _padded([7, 4])  # width 7: padded to a multiple of sp, and to 3 rows
    parts = [seqp.shard(b, r, sp, rows=3, pad_id=0) for r in range(sp)]
    width = -(-7 // sp) * sp
    ids = torch.cat([p.input_ids for p in parts], 1)
    assert ids.shape == (3, width) and torch.equal(ids[:2, :7], b.input_ids) and not ids[2].any()
    tgt = torch.cat([p.targets for p in parts], 1)
    # targets are pre-shifted: a shard's last position is scored against the next shard's first token
    assert torch.equal(tgt[:2, :7], b.targets) and (tgt[:, 7:] == -100).all() and (tgt[2] == -100).all()
    pos = torch.cat([p.position_ids for p in parts], 1)
    assert pos[0, :7].tolist() == list(range(7)) and pos[1, :4].tolist() == list(range(4))
    assert sum(p.n_loss for p in parts) == b.n_loss and sum(p.n_tokens for p in parts) == b.n_tokens == 11
    for p in parts:
        assert p.attention_mask is None and p.loss_index.tolist() == (
            (p.targets.flatten() != -100).nonzero().squeeze(1).tolist()
        )
        assert p.input_ids.shape == (3, width // sp)


@pytest.mark.unit
def test_packed_shards_keep_their_positions_and_padding_adds_no_boundary():
    from dist_ft.data.chat import Example
    from dist_ft.data.packing import collate_packed

    exs = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in (3, 2, 4)]
    b = collate_packed([exs[:2], exs[2:]], seq_len=6, pad_id=0)  # rows of 5 and 4 tokens, then padding
    parts = [seqp.shard(b, r, 4, rows=3, pad_id=0) for r in range(4)]
    pos = torch.cat([p.position_ids for p in parts], 1)
    # the examples and the packer's padding restart (as at sp=1); the padding to a multiple of sp goes on
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3], list(range(8))]
    assert all(p.cu_seq_lens is None for p in parts) and sum(p.n_loss for p in parts) == b.n_loss


@pytest.mark.unit
def test_per_example_attention_equals_the_block_diagonal_mask():
    """What Ulysses' kernel sees after its all-to-all: whole packed rows, no mask. Per example, it gives what
    sdpa gives with the block-diagonal causal mask transformers builds from the positions at sp=1."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dist_ft.engine_sp import per_example

    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2], list(range(9))])
    got, _ = per_example(sdpa_attention_forward, module, q, k, v, None, position_ids=pos, dropout=0.0)
    doc = (pos == 0).cumsum(1)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    plain, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0)
    assert not torch.allclose(plain[0], want[0], atol=1e-3)  # (without it, examples see each other)


@pytest.mark.unit
def test_readers_and_refusals():
    assert [seqp.readers(r, 4, 2) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    with pytest.raises(UserError, match="does not divide the world size 3"):
        seqp.readers(0, 3, 2)
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl", "packing": False}}
    Config.model_validate({**base, "engine": {"sequence_parallel": 2}})
    Config.model_validate(
        {**base, "data": {"train": "t.jsonl"}, "engine": {"sequence_parallel": 2}}
    )  # packed
    for change, why in (
        (
            {"data": {"train": "t.jsonl", "packing": False, "task": "reward"}},
            "sft, pretrain and dpo, not reward",
        ),
        ({"model": {"path": "m", "attn_implementation": "eager"}}, "sdpa or flash_attention_2"),
        ({"model": {"path": "m", "peft": {"method": "prefix"}}}, "prefix"),
        ({"model": {"path": "m", "activation_offload": True}}, "needs model.gradient_checkpointing: true"),
    ):
        with pytest.raises(ValueError, match=why):
            Config.model_validate({**base, "engine": {"sequence_parallel": 2}, **change})


@pytest.mark.unit
def test_a_shard_without_loss_still_gives_the_output_layer_a_gradient():
    """A sequence-parallel shard of prompt tokens has no loss-bearing position: the fused loss must still
    hand the output layer a (zero) gradient, as autograd does for a used weight - ZeRO 1-3 reduce one for every
    parameter (a missing one failed inside DeepSpeed before)."""
    from dist_ft.loss import linear_cross_entropy

    w = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    h = torch.randn(0, 8, requires_grad=True)
    linear_cross_entropy(h, w, b, torch.zeros(0, dtype=torch.long), chunk=4).backward()
    assert w.grad is not None and not w.grad.any() and b.grad is not None and not b.grad.any()


@pytest.mark.unit
def test_a_sequence_parallel_group_stays_on_one_node():
    assert seqp.spanning(["a"] * 4 + ["b"] * 4, 4) is None and seqp.spanning(["a"] * 4 + ["b"] * 4, 2) is None
    why = seqp.spanning(["a"] * 4 + ["b"] * 4, 8)
    assert why is not None and "ranks 0-7 would share sequences across nodes (a, b)" in why
    assert "a divisor of the ranks per node (4)" in why
    # 3 ranks per node: groups of 2 would straddle nodes 0 and 1 at ranks 2-3
    assert "ranks 2-3" in (seqp.spanning(["a"] * 3 + ["b"] * 3, 2) or "")


# ---------------------------------------------------------------- training on CPU ranks

STEPS = 4


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def runs(request, tmp_path_factory, gpt2_dir, llama_dir):
    """One model's reference (sp=1, one rank) and its sp=2 runs at ZeRO-0 and ZeRO-3 (2 ranks)."""
    model = gpt2_dir if request.param == "gpt2" else llama_dir
    tmp = tmp_path_factory.mktemp(f"sp-{request.param}")
    cfg = tiny.run_config(
        tmp,
        model,
        48,
        f"max_steps: {STEPS}, micro_batch_size: 2, grad_accum: 2, lr: 3.0e-3, warmup_steps: 1, eval_every: 2",
        "precision: fp32",
        "checkpoint: {every_steps: 2}\ntrack: {wandb: disabled}\n",
    )
    data = ("data.packing=false", f"data.validation={tmp / 'train.jsonl'}")
    out = {}
    sp2 = ("engine.sequence_parallel=2",)
    # (one run per layout, split over the two models to keep the suite short: the sp=1 reference, then)
    todo = [("sp1", 1, ())]
    if request.param == "llama":
        # ZeRO-2, and ZeRO-3 with the MLP tiled over the sequence (DeepSpeed's TiledMLP) and checkpointed
        # layers with their inputs offloaded (a no-op on CPU, the wiring exercised)
        offload = ("model.gradient_checkpointing=true", "model.activation_offload=true")
        todo += [
            ("sp2-z2", 2, (*sp2, "engine.zero_stage=2")),
            ("sp2-z3-tiled", 2, (*sp2, "engine.zero_stage=3", "model.tiled_mlp=3", *offload)),
        ]
    else:  # ZeRO 0 and 3, LoRA, and packed rows (several examples each: Ulysses' kernel attends per example)
        lora = ("model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8", "model.peft.dropout=0")
        todo += [
            ("sp2-z0", 2, sp2),
            ("sp2-z3", 2, (*sp2, "engine.zero_stage=3")),
            ("sp1-lora", 1, lora),
            ("sp2-lora", 2, (*lora, *sp2)),
            ("sp1-packed", 1, ("data.packing=true",)),
            ("sp2-packed", 2, ("data.packing=true", *sp2)),
        ]
    for name, ranks, extra in todo:
        r = run_cmd(train_cmd(cfg, tmp / name, ranks, *data, *extra))
        assert r.returncode == 0, r.stderr[-4000:]
        out[name] = tmp / name
    return cfg, data, out, r.stdout


def _weights_close(a, b) -> bool:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    d = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    assert float(d.max()) < 1e-4 and float(d.mean()) < 1e-7, (float(d.max()), float(d.mean()))
    return True


# (ZeRO-1 partitions what ZeRO-2 does less the gradients; ZeRO-2 stands for both, to keep the suite short)
@pytest.mark.parametrize("run", ["sp2-z0", "sp2-z2", "sp2-z3", "sp2-z3-tiled"])
def test_sp2_trains_like_one_rank(runs, run):
    _, _, out, stdout = runs
    if run not in out:
        pytest.skip("ZeRO 0 and 3 run on GPT-2, ZeRO-2 and ZeRO-3 with tiling on Llama")
    ref, got = out["sp1"], out[run]
    lr, lg = tiny.losses(ref), tiny.losses(got)
    assert len(lg) == STEPS and max(abs(a - b) for a, b in zip(lr, lg, strict=True)) < TOL, (lr, lg)
    assert _weights_close(ref, got)
    vr, vg = (
        [x["val_loss"] for x in metric_records(ref) if "val_loss" in x],
        [x["val_loss"] for x in metric_records(got) if "val_loss" in x],
    )
    assert len(vg) == 2 and max(abs(a - b) for a, b in zip(vr, vg, strict=True)) < TOL, (vr, vg)
    # every loss-bearing token counted once over the two shards
    tokens = [[x["loss_tokens"] for x in metric_records(o) if "loss_tokens" in x] for o in (ref, got)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == STEPS


def test_packed_rows_under_sp2_train_like_one_rank(runs):
    _, _, out, _ = runs
    if "sp2-packed" not in out:
        pytest.skip("packed rows run on GPT-2")
    ref, got = out["sp1-packed"], out["sp2-packed"]
    lr, lg = tiny.losses(ref), tiny.losses(got)
    assert len(lg) == STEPS and max(abs(a - b) for a, b in zip(lr, lg, strict=True)) < TOL, (lr, lg)
    assert _weights_close(ref, got)
    tokens = [
        [x["loss_tokens"] for x in metric_records(o) if "loss_tokens" in x] for o in (ref, got, out["sp1"])
    ]
    assert tokens[0] == tokens[1]
    assert tokens[0][0] > 2 * tokens[2][0]  # rows really are packed: more examples per step than unpacked


def test_lora_under_sp2_trains_like_one_rank(runs):
    _, _, out, _ = runs
    if "sp2-lora" not in out:
        pytest.skip("LoRA runs on GPT-2")
    a, b = tiny.losses(out["sp1-lora"]), tiny.losses(out["sp2-lora"])
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOL, (a, b)
    wa = load_file(out["sp1-lora"] / "final" / "adapter" / "adapter_model.safetensors")
    wb = load_file(out["sp2-lora"] / "final" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_sp2_sigkill_resume_is_bit_identical_and_sp_changes_are_refused(runs):
    cfg, data, out, _ = runs
    if "llama" not in str(cfg):
        pytest.skip("one model is enough for resume")
    killed = cfg.parent / "sp2-killed"
    args = (*data, "engine.sequence_parallel=2", "engine.zero_stage=2")
    r = run_cmd(train_cmd(cfg, killed, 2, *args), {"DIST_FT_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0 and not (killed / "final").exists()
    # the layout is part of what a checkpoint continues: another sp degree is refused in one line
    r = run_cmd(train_cmd(cfg, killed, 2, *data, "engine.zero_stage=2"))
    errors = {line for line in r.stderr.splitlines() if line.startswith("error: ")}  # (each rank says it)
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "config differs from the checkpoint in engine.sequence_parallel" in errors.pop()
    r = run_cmd(train_cmd(cfg, killed, 2, *args))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert_identical_runs(out["sp2-z2"], killed)


def test_dp2_by_sp2_on_four_ranks_equals_dp2(runs):
    cfg, data, out, _ = runs
    if "gpt2" not in str(cfg):
        pytest.skip("one model is enough for dp x sp")
    dp2, dp2sp2 = cfg.parent / "dp2", cfg.parent / "dp2-sp2"
    small = ("train.micro_batch_size=1", "train.max_steps=2", "track.sample_prompts=[]")
    r = run_cmd(train_cmd(cfg, dp2, 2, *data, *small))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cmd(train_cmd(cfg, dp2sp2, 4, *data, *small, "engine.sequence_parallel=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 data-parallel ranks (sequence parallel: 2 ranks per sequence)" in r.stdout
    la, lb = tiny.losses(dp2), tiny.losses(dp2sp2)
    assert len(lb) == 2 and max(abs(a - b) for a, b in zip(la, lb, strict=True)) < TOL, (la, lb)
    assert _weights_close(dp2, dp2sp2)
