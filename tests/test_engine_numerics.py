"""The engine's numerics on a real cluster, checked on CPU: which precision `auto` picks on each GPU generation,
bf16 gradients summed in fp32 over micro-batches and ranks, weight decay under ZeRO-3 (whose parameters are
1-D placeholders) and a resumed run's optimizer settings landing in the right named group.

The multi-rank half is one 2-rank launch of tests/engine_numerics.py that several tests read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port

from dist_ft import engine as eng
from dist_ft import optim
from dist_ft import precision as prec
from dist_ft.config import Config
from dist_ft.errors import UserError

# ---------------------------------------------------------------- precision: auto


@pytest.mark.parametrize(
    "gpu,capability,picked",
    [
        ("V100", (7, 0), "fp16"),
        ("T4", (7, 5), "fp16"),
        ("A100", (8, 0), prec.AUTOCAST),
        ("H100", (9, 0), prec.AUTOCAST),
    ],
)
@pytest.mark.unit
def test_auto_precision_is_bf16_only_where_the_gpu_has_bf16_tensor_cores(
    monkeypatch, gpu, capability, picked
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # true on V100 / T4 too: emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for stage in (0, 1, 2):
        assert prec.resolve("auto", stage) == picked, gpu
    # where memory decides, bf16 weights
    bf16 = "bf16" if picked == prec.AUTOCAST else picked
    assert prec.resolve("auto", 3) == bf16 and prec.resolve("auto", 2, offload_optimizer=True) == bf16
    # explicit choices stand
    assert prec.resolve("bf16", 0) == "bf16" and prec.resolve("fp16", 3) == "fp16"
    # what auto meant before manifests recorded it
    assert prec.resolved_before_recorded("auto") == bf16 and prec.resolved_before_recorded(prec.AUTOCAST) == (
        prec.AUTOCAST
    )


@pytest.mark.unit
@pytest.mark.parametrize("native,picked", [(True, prec.AUTOCAST), (False, "fp32")])
def test_auto_precision_on_cpu(monkeypatch, native, picked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: native)
    assert prec.resolve("auto") == picked
    assert prec.resolve("auto", 3) == ("bf16" if native else "fp32")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        prec.resolve("fp16")


# ---------------------------------------------------------------- the DeepSpeed config for bf16 gradients


def _cfg(stage: int, grad_accum: int) -> Config:
    return Config.model_validate(
        {
            "model": {"path": "m"},
            "data": {"train": "t.jsonl"},
            "train": {"grad_accum": grad_accum},
            "engine": {"zero_stage": stage},
        }
    )


@pytest.mark.unit
def test_bf16_gradients_are_summed_in_fp32_or_refused():
    for stage in (1, 2, 3):
        conf = eng.ds_config(_cfg(stage, 16), "bf16")
        assert (
            conf["data_types"] == {"grad_accum_dtype": "fp32"} and conf["communication_data_type"] == "fp32"
        )
    # one micro-batch per step: nothing accumulates, the all-reduce is fp32
    conf = eng.ds_config(_cfg(0, 1), "bf16")
    assert "data_types" not in conf and conf["communication_data_type"] == "fp32"
    # DeepSpeed has no fp32 accumulator at ZeRO-0
    with pytest.raises(UserError, match="engine.zero_stage: 1"):
        eng.ds_config(_cfg(0, 2), "bf16")
    for precision in ("fp32", "fp16"):
        conf = eng.ds_config(_cfg(0, 4), precision)
        assert "data_types" not in conf and "communication_data_type" not in conf


# ---------------------------------------------------------------- weight-decay groups, resumed settings


@pytest.mark.unit
def test_decay_groups_follow_the_real_shape_and_are_named():
    placeholder = torch.nn.Parameter(torch.zeros(8))
    placeholder.ds_shape = torch.Size([4, 2])  # a ZeRO-3 partitioned matrix: 1-D here, 2-D for real
    bias = torch.nn.Parameter(torch.zeros(4))
    norm = torch.nn.Parameter(torch.zeros(0))
    norm.ds_shape = torch.Size([4])  # a partitioned norm weight stays undecayed
    frozen = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    groups = optim.build([("h.0.w", placeholder), ("h.0.b", bias), ("ln.w", norm), ("emb", frozen)], 0.5)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["params"] == [placeholder] and groups[0]["weight_decay"] == 0.5
    assert groups[1]["params"] == [bias, norm] and groups[1]["weight_decay"] == 0.0


@pytest.mark.unit
def test_resumed_settings_land_in_the_named_groups():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    # DeepSpeed dropped the empty decay group: the only group left (index 0) is the no-decay one
    opt = torch.optim.AdamW([{"name": "no_decay", "params": [b], "weight_decay": 0.0}], lr=1.0)
    optim.apply(
        opt.param_groups, ["no_decay"], lr=0.1, lr_factor=0.5, betas=(0.5, 0.6), eps=1e-6, weight_decay=0.3
    )
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["betas"] == (0.5, 0.6) and opt.param_groups[0]["initial_lr"] == 0.1
    # a checkpoint saved before groups had names restores groups without them: the names recorded at build count
    opt = torch.optim.AdamW(
        [{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.7}], lr=1.0
    )
    optim.apply(
        opt.param_groups,
        ["decay", "no_decay"],
        lr=0.1,
        lr_factor=1.0,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.3,
    )
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("decay", 0.3), ("no_decay", 0.0)]
    with pytest.raises(ValueError):
        optim.apply(
            opt.param_groups, ["decay"], lr=0.1, lr_factor=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.3
        )


# ---------------------------------------------------------------- 2 CPU ranks: one launch, several checks


@pytest.fixture(scope="module")
def numerics(tmp_path_factory, gpt2_dir):
    out = tmp_path_factory.mktemp("numerics")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "tests/engine_numerics.py",
            str(gpt2_dir),
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return json.loads((out / "result.json").read_text()), out


def _bf16_sum(values) -> float:
    acc = torch.zeros((), dtype=torch.bfloat16)
    for v in values:
        acc = acc + torch.tensor(v, dtype=torch.bfloat16)
    return float(acc)


def test_bf16_gradients_accumulate_and_reduce_in_fp32(numerics):
    import engine_numerics as probe

    res, _ = numerics
    n = probe.ACCUM * res["world"]
    contributions = [
        [probe.micro_x(m, r)[j] for r in range(res["world"]) for m in range(probe.ACCUM)]
        for j in range(probe.K)
    ]
    exact = torch.tensor([sum(c) / n for c in contributions])
    # what bf16 arithmetic makes of the same sums, whether each rank accumulates first (ZeRO-1) or every micro-batch is
    # reduced first (ZeRO 2-3): visibly off, by far more than bf16's relative step of 2^-8
    w, a = res["world"], probe.ACCUM
    accumulate_first = [sum(_bf16_sum(c[r * a : (r + 1) * a]) for r in range(w)) / n for c in contributions]
    reduce_first = [
        _bf16_sum(_bf16_sum(c[r * a + m] for r in range(w)) for m in range(a)) / n for c in contributions
    ]
    for summed in (accumulate_first, reduce_first):
        assert ((torch.tensor(summed) - exact).abs() / exact.abs()).max() > 2**-6, summed
    for stage in (1, 2, 3):
        fp32, bf16 = res["grads"][f"{stage}-fp32"], res["grads"][f"{stage}-bf16"]
        torch.testing.assert_close(torch.tensor(fp32["grad"]), exact, rtol=1e-6, atol=0)
        # the bf16 run equals the fp32 reference to bf16 tolerance (here even exactly: every summand is a power of two)
        torch.testing.assert_close(
            torch.tensor(bf16["grad"]),
            exact,
            rtol=2**-8,
            atol=0,
            msg=lambda m, stage=stage, bf16=bf16: f"ZeRO {stage}: {m} {bf16}",
        )
        assert bf16["norm"] == pytest.approx(float(exact.norm()), rel=2**-8), (stage, bf16)


def _reference_weights(model_dir: Path, weight_decay: float) -> dict:
    """One process, plain torch AdamW (what ZeRO-0 in fp32 runs), the full global batch: matrices decayed, 1-D not."""
    import engine_numerics as probe

    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    cfg = probe.config(str(model_dir), 0, "fp32", eps=probe.EPS)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok, torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=probe.LR,
        betas=cfg.train.betas,
        eps=cfg.train.eps,
    )
    for ids in probe.rows(0, 1, len(tok)):
        opt.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_weight_decay_under_zero3_on_two_ranks_equals_one_process(numerics, gpt2_dir):
    import engine_numerics as probe

    res, out = numerics
    ref, undecayed = _reference_weights(gpt2_dir, probe.WD), _reference_weights(gpt2_dir, 0.0)
    # the control: decay moves the weights far more than the tolerance (else equality would prove nothing)
    assert max(float((ref[k] - undecayed[k]).abs().max()) for k in ref) > 1e-3
    assert [0] in res["decay"]["3"]["placeholder_shapes"]  # ZeRO-3 really built its 1-D placeholders
    for stage in (3, 0):
        got = torch.load(out / f"weights-zero{stage}.pt")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(
                got[k], ref[k], atol=2e-5, rtol=0, msg=lambda m, stage=stage, k=k: f"ZeRO {stage} {k}: {m}"
            )
        decay = res["decay"][str(stage)]
        assert {n: g["weight_decay"] for n, g in decay["groups"].items()} == {
            "decay": probe.WD,
            "no_decay": 0.0,
        }, decay
        if stage == 0:  # (ZeRO-3 hands its groups their partitions only during a step)
            assert (
                decay["groups"]["decay"]["n_params"] == 10 and decay["groups"]["no_decay"]["n_params"] == 18
            )
        assert decay["resumed"] == {"decay": 0.25, "no_decay": 0.0}  # apply_optimizer_settings, by group name
