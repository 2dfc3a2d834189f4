"""Multi-GPU tier: two ranks on two GPUs (NCCL), what a world size of 1 cannot show. Runs only where at least two CUDA
GPUs are visible, skipped everywhere else (CPU CI included):

    python3 -m pytest -q tests/gpu/test_multi_gpu.py     # a few minutes on 2 GPUs

- ZeRO-3 with the optimizer offloaded to the CPU (DeepSpeedCPUAdam), bf16, 2 ranks, 20 steps (the 8B config's
  layout): it learns, and the consolidated export loads through `from_pretrained` and equals its safetensors;
- SIGKILL of the whole job after step 12 and a resume from step 10 on the same 2 ranks: every loss and every
  exported weight bit-identical to the uninterrupted run (eager attention and deterministic cuBLAS, as in
  test_gpu.py; dropout on, so each rank's CUDA generator must be restored);
- packed rows at micro batch 2 with flash-attention-2 (skipped without `flash_attn`): a model trained until it relies
  on its context scores the same validation loss (and trains at the same loss) packed as unpacked. Transformers reads
  restarting position_ids as packing only at batch size 1, so without the batch's varlen boundaries the second and
  later examples of each row attend to the ones before them, and this model's loss grows by an order of magnitude.

DIST_FT_MULTI_GPU_ON_CPU=1 runs the tier on two CPU ranks (gloo, fp32; the packing test with sdpa) where fewer than two
GPUs are visible: a way to check the tier's own logic on a machine without GPUs. CI never sets it.
"""

import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ON_CPU = GPUS < 2 and os.environ.get("DIST_FT_MULTI_GPU_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(
    GPUS < 2 and not ON_CPU, reason=f"multi-GPU tier: needs >= 2 CUDA GPUs ({GPUS} visible)"
)

import tiny  # noqa: E402
from helpers import REPO, assert_ok, metric_records, train_cmd  # noqa: E402  (tests/helpers.py)

PRECISION, BACKEND = ("fp32", "gloo") if ON_CPU else ("bf16", "nccl")
STEPS, EVERY, KILL_AT = 20, 5, 12
EAGER = (
    "model.attn_implementation=eager",
)  # deterministic kernels: sdpa's CUDA backward accumulates with atomics


def _launch(
    cfg: Path, out: Path, *overrides: str, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """2 ranks through the deepspeed launcher, in their own session: the kill hook SIGKILLs the whole process group
    (launcher and ranks), as a node failure would."""
    return subprocess.run(
        train_cmd(cfg, out, 2, *overrides),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


# ---------------------------------------------------------------- ZeRO-3 + optimizer offload on 2 ranks


@pytest.fixture(scope="module")
def z3_cfg(tmp_path_factory, gpt2_dropout_dir) -> Path:
    return tiny.run_config(
        tmp_path_factory.mktemp("multi_gpu_z3"),
        gpt2_dropout_dir,
        160,
        f"max_steps: {STEPS}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
        f"precision: {PRECISION}, zero_stage: 3, offload_optimizer: true",
        f"checkpoint: {{every_steps: {EVERY}}}\n",
    )


@pytest.fixture(scope="module")
def z3_env() -> dict:
    """Deterministic cuBLAS workspaces: the kill test compares runs bitwise (tests/gpu/conftest.py's det_env)."""
    return {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def z3_run(z3_cfg, z3_env) -> tuple[Path, str]:
    """The uninterrupted 20-step run: the learning test's subject and the kill test's reference."""
    out = z3_cfg.parent / "uninterrupted"
    return out, assert_ok(_launch(z3_cfg, out, *EAGER, env=z3_env)).stdout


def test_zero3_offload_on_two_gpus_learns_and_exports(z3_run, gpt2_dropout_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, stdout = z3_run
    assert (
        f"world 2 | ZeRO 3 | {PRECISION} | global batch = 2 micro x 1 accum x 2 ranks = 4 rows" in stdout
    ), stdout[-3000:]
    assert f"| {BACKEND} process group" in stdout
    losses = tiny.losses(out)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses  # it learns
    if not ON_CPU:
        steps = [r for r in metric_records(out) if "loss" in r]
        assert all(r["gpu_peak_mb"] > 0 for r in steps), steps[-1]
    # the export: consolidated from both ranks' ZeRO-3 partitions, loads as a Hugging Face model, equals its file
    weights = load_file(out / "final" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    state = model.state_dict()
    assert weights and all(torch.equal(state[k].to(v.dtype), v) for k, v in weights.items())
    assert {str(v.dtype) for v in weights.values() if v.is_floating_point()} == {
        f"torch.{'float32' if ON_CPU else 'bfloat16'}"
    }
    k = "transformer.h.0.mlp.c_fc.weight"  # and training moved the weights
    assert not torch.equal(
        weights[k], load_file(gpt2_dropout_dir / "model.safetensors")[k].to(weights[k].dtype)
    )


def test_sigkill_and_resume_on_two_gpus_is_bit_exact(z3_cfg, z3_env, z3_run):
    from safetensors.torch import load_file

    ref, _ = z3_run
    out = z3_cfg.parent / "killed"
    r = _launch(z3_cfg, out, *EAGER, env={**z3_env, "DIST_FT_TEST_KILL_AT_STEP": str(KILL_AT)})
    assert r.returncode == -signal.SIGKILL and not (out / "final").exists(), (r.returncode, r.stderr[-3000:])
    assert tiny.losses(out) == tiny.losses(ref)[:KILL_AT], (
        "two uninterrupted runs already differ before the kill: the kernels "
        "or collectives are not deterministic here, so a bitwise resume cannot be "
        "judged"
    )
    resumed = KILL_AT // EVERY * EVERY
    r = assert_ok(_launch(z3_cfg, out, *EAGER, env=z3_env))
    assert f"resumed from {out / 'checkpoints' / f'step-{resumed}'}" in r.stdout
    assert tiny.losses(out) == tiny.losses(ref)
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


# ---------------------------------------------------------------- packed rows, micro batch 2, flash-attention-2


def test_two_packed_rows_train_and_score_as_unpacked_with_flash_attention(tmp_path, gpt2_dir):
    # on CPU ranks a dry run of the test's logic (sdpa needs no boundaries)
    attn = "sdpa" if ON_CPU else "flash_attention_2"
    if not ON_CPU:
        try:
            import flash_attn  # noqa: F401
        except Exception:
            pytest.skip("flash_attn is not installed")
    # 1. a model that relies on its context: trained unpacked (no packing question yet) until it copies the thing asked
    #    about into its answer (validation loss ~0.02 here; attending across examples costs it ~0.5, measured on CPU)
    cfg = tiny.run_config(
        tmp_path,
        gpt2_dir,
        320,
        "max_steps: 300, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 5, schedule: constant",
        f"precision: {PRECISION}, zero_stage: 2",
    )
    cfg.write_text(cfg.read_text().replace("max_seq_len: 128}", "max_seq_len: 128, val_fraction: 0.25}"))
    trained = tmp_path / "trained"
    assert_ok(_launch(cfg, trained, "data.packing=false"))
    # 2. score it packed and unpacked with flash-attention-2 at micro batch 2: one step at a vanishing LR (the weights
    #    keep their bf16 values), then the validation pass over all held-out examples
    scored = {}
    for packing in (True, False):
        out = tmp_path / f"fa2-packing-{packing}"
        r = assert_ok(
            _launch(
                cfg,
                out,
                f"model.path={trained / 'final'}",
                f"model.attn_implementation={attn}",
                f"data.packing={str(packing).lower()}",
                "train.micro_batch_size=2",
                "train.max_steps=1",
                "train.lr=1e-12",
                "train.warmup_steps=0",
            )
        )
        unit = "rows" if packing else "examples"
        assert (
            f"world 2 | ZeRO 2 | {PRECISION} | global batch = 2 micro x 1 accum x 2 ranks = 4 {unit}"
            in r.stdout
        )
        if packing:
            # (several examples per row: what the boundaries are for)
            assert " packed rows of 128" in r.stdout
        val = [x["val_loss"] for x in metric_records(out) if "val_loss" in x]
        scored[packing] = (tiny.losses(out)[0], val[-1])
    (train_p, val_p), (train_u, val_u) = scored[True], scored[False]
    assert val_u < 0.2, f"the model did not learn enough to tell (validation loss {val_u:.3f} unpacked)"
    # bf16 noise; a leak across examples adds ~0.3-0.6
    assert abs(val_p - val_u) <= 0.1 * val_u + 0.01, scored
    # the training forward too (step 1: different rows, both learned)
    assert train_p < 0.2 and train_u < 0.2, scored


def test_sequence_parallel_on_two_gpus_trains_like_one(tmp_path, llama_dir):
    """engine.sequence_parallel 2 over NCCL (DeepSpeed's Ulysses all-to-alls on GPUs): the same rows train to the
    same losses as one rank holding whole sequences (bf16: within bf16 noise), at ZeRO-3 with the MLP tiled."""
    cfg = tiny.run_config(
        tmp_path,
        llama_dir,
        64,
        "max_steps: 6, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 1",
        f"precision: {PRECISION}, zero_stage: 3",
    )
    one, two = tmp_path / "sp1", tmp_path / "sp2"
    # one rank, whole sequences
    single = subprocess.run(
        train_cmd(cfg, one, 1, "data.packing=false"), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert_ok(single)
    r = assert_ok(_launch(cfg, two, "data.packing=false", "engine.sequence_parallel=2", "model.tiled_mlp=2"))
    assert "(sequence parallel: 2 ranks per sequence)" in r.stdout
    a, b = tiny.losses(one), tiny.losses(two)
    tol = 1e-4 if ON_CPU else 3e-2  # fp32 summation order on CPU; bf16 rounding on GPUs
    assert len(b) == 6 and all(abs(x - y) <= tol * max(1.0, abs(x)) for x, y in zip(a, b, strict=True)), (
        a,
        b,
    )
