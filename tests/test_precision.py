"""The two bf16 modes (issue #27): `bf16` (bf16 weights, fp32 masters that start from the checkpoint's fp32 weights)
and `bf16-autocast` (fp32 weights, bf16 compute through DeepSpeed's torch_autocast).

The engine half is one single-rank run of tests/precision_probe.py that several tests read; the training half runs
`dist-ft train` on CPU ranks (autocast at ZeRO-0 and ZeRO-3 with grad_accum 2, exact resume after SIGKILL)."""

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch
from helpers import REPO, assert_clean_failure, assert_identical_runs, free_port, run_cmd, train_cmd

from dist_ft import engine as eng
from dist_ft import precision as prec
from dist_ft.config import Config

# ---------------------------------------------------------------- config


def _cfg(stage: int, grad_accum: int, precision: str = "bf16-autocast") -> Config:
    return Config.model_validate(
        {
            "model": {"path": "m"},
            "data": {"train": "t.jsonl"},
            "train": {"grad_accum": grad_accum},
            "engine": {"zero_stage": stage, "precision": precision},
        }
    )


@pytest.mark.unit
def test_autocast_runs_fp32_weights_under_deepspeeds_torch_autocast():
    for stage in (0, 1, 2, 3):
        # ZeRO-0 + grad_accum 2 is fine: gradients are fp32
        conf = eng.ds_config(_cfg(stage, 2), prec.AUTOCAST)
        assert conf["bf16"] == {"enabled": False} and conf["fp16"]["enabled"] is False
        # no module's gradients marked for bf16 communication: every reduction stays fp32
        assert conf["torch_autocast"] == {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
        assert "data_types" not in conf and "communication_data_type" not in conf
    assert "torch_autocast" not in eng.ds_config(_cfg(1, 2, "bf16"), "bf16")
    assert prec.resolve(prec.AUTOCAST) == prec.AUTOCAST and prec.torch_dtype(prec.AUTOCAST) == torch.float32


@pytest.mark.unit
def test_fp32_sources_only_where_deepspeed_casts_the_module():
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    assert [p for p, _ in prec.fp32_sources(model, "bf16", 2)] == [model.weight]  # trainable only
    # the tensor itself, kept past the cast
    assert prec.fp32_sources(model, "bf16", 2)[0][1] is not model.weight
    for precision in ("fp32", prec.AUTOCAST):  # nothing cast
        assert prec.fp32_sources(model, precision, 0) == []
    # ZeRO-3: what zero.Init partitioned (ds_id) is bf16 already, what came after (adapters) is not
    assert [p for p, _ in prec.fp32_sources(model, "bf16", 3)] == [model.weight]
    model.weight.ds_id = 0
    assert prec.fp32_sources(model, "bf16", 3) == []


@pytest.mark.unit
def test_file_keys_with_and_without_the_base_model_prefix():
    assert prec.file_keys("transformer.h.0.attn.c_attn.weight", "transformer") == [
        "transformer.h.0.attn.c_attn.weight",
        "h.0.attn.c_attn.weight",  # hub gpt2's model.safetensors
    ]
    assert prec.file_keys("base_model.model.lm_head.weight", "transformer") == [
        "lm_head.weight",
        "transformer.lm_head.weight",
    ]


@pytest.mark.unit
def test_safetensors_files_single_and_sharded(tmp_path):
    from safetensors.torch import save_file

    from dist_ft.config import ModelConfig
    from dist_ft.hub import safetensors_files

    save_file({"a": torch.zeros(1), "b": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert safetensors_files(ModelConfig(path=str(tmp_path))) == dict.fromkeys(
        "ab", str(tmp_path / "model.safetensors")
    )
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}})
    )
    assert safetensors_files(ModelConfig(path=str(sharded))) == {
        "a": str(sharded / "model-00001.safetensors"),
        "b": str(sharded / "model-00002.safetensors"),
    }
    assert safetensors_files(ModelConfig(path=str(tmp_path), gguf_file="m.gguf")) == {}


# ---------------------------------------------------------------- one rank: masters, one step, learning


@pytest.fixture(scope="module")
def probe(tmp_path_factory, gpt2_dir):
    out = tmp_path_factory.mktemp("precision")
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run(
        [sys.executable, "tests/precision_probe.py", str(gpt2_dir), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out / "result.pt")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_masters_start_from_the_fp32_weights(probe, stage, gpt2_dir):
    """Before any step the masters are the checkpoint's fp32 weights exactly (DeepSpeed alone makes them from the
    bf16-rounded weights; ZeRO-3 partitions them in bf16 at load, so its masters are read from the model's
    files); after one AdamW step they equal the fp32 run's weights within 1e-6 wherever both runs took a full
    lr-sized first Adam step in the same direction (the gradients agree in sign and are >> eps). At ZeRO-3 the
    embedding's rows for the new chat tokens are drawn from the bf16 weights' mean: within 1e-5, not equal."""
    import precision_probe as pp

    init, before, one_bf16, one_fp32 = (
        probe["init"],
        probe[f"bf16_before_{stage}"],
        probe[f"bf16_one_{stage}"],
        probe["fp32_one"],
    )
    assert before.keys() == init.keys()
    stored = _stored_rows(gpt2_dir, init) if stage == 3 else {}
    for k in init:
        n = stored.get(k, len(init[k]))
        assert torch.equal(before[k][:n], init[k][:n]), k
        assert n == len(init[k]) or float((before[k][n:] - init[k][n:]).abs().max()) < 1e-5, k
    agree = total = 0
    for k in init:
        n = stored.get(k, len(init[k]))
        d32, dbf = one_fp32[k][:n] - init[k][:n], one_bf16[k][:n] - init[k][:n]
        mask = (d32.sign() == dbf.sign()) & (d32.abs() > 0.999 * pp.LR) & (dbf.abs() > 0.999 * pp.LR)
        agree, total = agree + int(mask.sum()), total + mask.numel()
        assert not mask.any() or float((one_bf16[k][:n] - one_fp32[k][:n])[mask].abs().max()) < 1e-6, k
    assert agree > 0.5 * total  # most weights: the rest saw (nearly) no gradient or one that bf16 flipped


def _stored_rows(model_dir, tensors: dict) -> dict[str, int]:
    """{name: rows in the model's file} for the tensors the load grew (embeddings for the chat tokens)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape()[0] for k in f.keys() if k in tensors}


def test_zero3_masters_on_two_ranks_are_the_files_fp32_weights(gpt2_dir, tmp_path):
    """Two CPU ranks, each holding half of every parameter: the whole masters gathered before any step are the
    model file's fp32 tensors (rows beyond the stored ones: the new chat tokens' draw), and a parameter made
    after loading keeps its fp32 values even where the ranks' partitions are padded."""
    from safetensors import safe_open

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [
        "--master_port",
        str(free_port()),
        "tests/precision_probe.py",
        str(gpt2_dir),
        str(tmp_path),
        "zero3",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    masters = torch.load(tmp_path / "zero3.pt")
    assert masters.pop("odd").tolist() == torch.tensor([[0.1, 0.2, 0.3]]).tolist()  # fp32, not bf16-rounded
    with safe_open(str(gpt2_dir / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(masters)
        for k in f.keys():
            stored = f.get_tensor(k)
            assert stored.dtype == torch.float32 and torch.equal(masters[k][: len(stored)], stored), k


def test_autocast_learns_closest_to_fp32(probe):
    """lr 1e-4, 5 steps on a fixed batch: |loss - fp32 loss| summed over the steps. Masters made from the bf16
    rounding (DeepSpeed's default) are far off; masters from fp32 close most of the gap; autocast is closest."""

    def gap(key):
        return sum(abs(a - b) for a, b in zip(probe[key], probe["loss_fp32"], strict=False))

    assert probe["loss_autocast"][-1] < probe["loss_autocast"][0]
    assert gap("loss_autocast") < gap("loss_bf16") < gap("loss_bf16_rounded_masters") / 5


# ---------------------------------------------------------------- dist-ft train in autocast


@pytest.fixture(scope="module")
def autocast_cfg(tmp_path_factory, gpt2_dir):
    return tiny.run_config(
        tmp_path_factory.mktemp("autocast"),
        gpt2_dir,
        64,
        "max_steps: 6, micro_batch_size: 2, grad_accum: 2, lr: 3.0e-3, warmup_steps: 1",
        "precision: bf16-autocast",
        "checkpoint: {every_steps: 2}\n",
    )


@pytest.mark.parametrize("ranks,stage", [(1, 0), (2, 3)])
def test_autocast_trains_at_zero0_and_zero3_with_grad_accum(autocast_cfg, ranks, stage):
    out = autocast_cfg.parent / f"run-{ranks}-{stage}"
    r = run_cmd(train_cmd(autocast_cfg, out, ranks, f"engine.zero_stage={stage}", "train.max_steps=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16-autocast" in r.stdout
    losses = tiny.losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_autocast_resume_after_sigkill_is_bit_exact(autocast_cfg):
    ref, out = autocast_cfg.parent / "ref", autocast_cfg.parent / "killed"
    assert run_cmd(train_cmd(autocast_cfg, ref, 1)).returncode == 0
    r = run_cmd(train_cmd(autocast_cfg, out, 1), {"DIST_FT_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0 and not (out / "final").exists()
    step2 = out / "checkpoints" / "step-2"
    assert json.loads((step2 / "manifest.json").read_text())["precision"] == prec.AUTOCAST
    # another precision would change what the weights and Adam states mean mid-run: refused, nothing touched
    ckpts = out / "checkpoints"
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in ckpts.rglob("*"))
    r = run_cmd(train_cmd(autocast_cfg, out, 1, "engine.precision=fp32"))
    assert_clean_failure(
        r, r"step-2: trained in bf16-autocast precision, this run sets engine.precision: fp32", None
    )
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in ckpts.rglob("*")) == before
    # auto continues the checkpoint's precision (whatever auto would pick on this machine for a fresh run)
    r = run_cmd(train_cmd(autocast_cfg, out, 1, "engine.precision=auto"))
    assert r.returncode == 0 and f"resumed from {out / 'checkpoints' / 'step-2'}" in r.stdout, r.stderr[
        -3000:
    ]
    assert_identical_runs(ref, out)


def test_autocast_with_lora_offload_and_the_divergence_guard(autocast_cfg):
    """The rest of what issue #27 asks both bf16 modes to keep: LoRA at ZeRO-2 with the optimizer offloaded
    trains and exports its adapter; a diverging step stops the run (exit 3) keeping only the last finite
    checkpoint."""
    out = autocast_cfg.parent / "lora-offload"
    lora = ("model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8", "model.peft.dropout=0")
    r = run_cmd(
        train_cmd(
            autocast_cfg,
            out,
            1,
            *lora,
            "engine.zero_stage=2",
            "engine.offload_optimizer=true",
            "train.max_steps=2",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16-autocast" in r.stdout and (out / "final" / "adapter" / "adapter_config.json").is_file()
    assert (
        json.loads((out / "checkpoints" / "step-2" / "manifest.json").read_text())["precision"]
        == prec.AUTOCAST
    )
    out = autocast_cfg.parent / "nan"
    r = run_cmd(train_cmd(autocast_cfg, out, 1, "train.lr=1e30", "checkpoint.every_steps=1"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 3 and len(errors) == 1 and "not finite" in errors[0], r.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
