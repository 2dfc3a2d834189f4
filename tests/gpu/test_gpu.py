"""GPU tier: what the CPU suite cannot show, on one CUDA GPU (every run is 1 rank, NCCL process group of size 1).

    python3 -m pytest -q tests/gpu          # a few minutes on one GPU; all skipped without CUDA

- bf16 training at ZeRO 0, 2 and 3 through `dist-ft train` (NCCL picked automatically): loss goes down, the
  three stages' loss curves agree to bf16 precision, GPU memory / MFU metrics are logged, the bf16 parameter
  bytes match the ZeRO formula (2 bytes per parameter); the same run under `deepspeed --num_gpus 1`;
- fp16 dynamic loss scaling: a forced overflow step is skipped (parameters and LR unchanged), the next is not;
- packed rows give the same logits as each example alone, on CUDA kernels (sdpa fp32/bf16, flash-attention-2
  when `flash_attn` is installed), and with flash-attention-2 two packed rows in one micro-batch too (varlen boundaries);
- SIGKILL + resume with bf16 ZeRO-2 ends bit-identical to the uninterrupted run (losses and weights);
- the ZeRO-3 export (`final/model.safetensors`) equals DeepSpeed's zero_to_fp32 reconstruction of the final
  checkpoint, cast to the exported dtype;
- `model.activation_offload`: checkpointed layers' inputs wait in host memory (device peak lower, gradients
  the same).
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU tier: needs a CUDA GPU (torch.cuda.is_available() is False)"
)

import tiny  # noqa: E402
from helpers import REPO, assert_ok, free_port, metric_records, run_cli  # noqa: E402  (tests/helpers.py)

HERE = Path(__file__).resolve().parent
STAGES = (0, 2, 3)
BF16_REL = 5e-2  # loss curves of different ZeRO stages / launchers in bf16: reduction order differs, bf16 rounding grows
STEPS = 8


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b, strict=False))


# ---------------------------------------------------------------- bf16 at ZeRO 0 / 2 / 3


@pytest.fixture(scope="module")
def bf16_cfg(tmp_path_factory, gpt2_dir) -> Path:
    return tiny.run_config(
        tmp_path_factory.mktemp("gpu_bf16"),
        gpt2_dir,
        160,
        f"max_steps: {STEPS}, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 2",
        "precision: bf16",
    )


@pytest.fixture(scope="module")
def zero_run(bf16_cfg):
    """stage -> (output dir, stdout) of `dist-ft train` at that ZeRO stage; each run once per module."""
    done: dict = {}

    def get(stage: int):
        if stage not in done:
            out = bf16_cfg.parent / f"zero{stage}"
            r = assert_ok(run_cli("train", str(bf16_cfg), f"engine.zero_stage={stage}", f"output.dir={out}"))
            done[stage] = (out, r.stdout)
        return done[stage]

    return get


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_training_on_one_gpu(zero_run, stage):
    from dist_ft import perf

    out, stdout = zero_run(stage)
    assert f"world 1 | ZeRO {stage} | bf16" in stdout
    assert "| nccl process group" in stdout  # engine.dist_backend auto -> NCCL on a GPU
    losses = tiny.losses(out)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.9 * losses[0], losses  # it learns
    steps = [r for r in metric_records(out) if "loss" in r]
    peak = perf.peak_flops()
    for r in steps:
        assert r["gpu_peak_mb"] > 0 and r["gpu_alloc_mb"] > 0 and "rss_mb" not in r, r
        # MFU only where the GPU's peak FLOP/s is known (perf.PEAK_FLOPS); the key is written as null otherwise
        assert (r.get("mfu") is not None) == (peak is not None), (torch.cuda.get_device_name(), r.get("mfu"))
        if peak is not None:
            assert 0 < r["mfu"] < 1, r["mfu"]
    mem = next((r for r in metric_records(out) if "mem_params_bytes" in r), None)
    assert mem is not None, "model-state bytes were not measured at step 2"
    # bf16 parameters on the GPU: 2 bytes per parameter (world 1: nothing sharded away, even at ZeRO-3)
    assert mem["mem_params_bytes"] == pytest.approx(mem["mem_formula_params_bytes"], rel=0.02), mem


def test_bf16_zero_stages_agree(zero_run):
    curves = {s: tiny.losses(zero_run(s)[0]) for s in STAGES}
    for s in STAGES[1:]:
        assert _max_rel(curves[0], curves[s]) <= BF16_REL, curves


def test_deepspeed_launcher_on_one_gpu(bf16_cfg, zero_run):
    out = bf16_cfg.parent / "launcher-zero2"
    r = assert_ok(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--num_gpus",
                "1",
                "--master_port",
                str(free_port()),
                "launch/train.py",
                str(bf16_cfg),
                "engine.zero_stage=2",
                f"output.dir={out}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert "world 1 | ZeRO 2 | bf16" in r.stdout and "| nccl process group" in r.stdout
    assert r.stdout.count(f"step {STEPS:>6} | loss") == 1
    assert _max_rel(tiny.losses(zero_run(2)[0]), tiny.losses(out)) <= BF16_REL
    assert (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------- fp16 dynamic loss scaling


def test_fp16_forced_overflow_is_skipped(gpt2_dir, repo_pythonpath):
    r = assert_ok(
        subprocess.run(
            [sys.executable, str(HERE / "fp16_overflow.py"), str(gpt2_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **repo_pythonpath},
        )
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-3000:]
    res = json.loads(line[len("RESULT ") :])
    assert res["backend"] == "nccl" and res["world"] == 1 and res["fp16_enabled"], res
    applied, forced, after = res["warmup"][-1], res["forced"], res["after"]
    assert applied["param_dtype"] == "torch.float16", applied
    assert (
        applied["skipped"] == 0 and applied["params_moved"] and applied["lr_after"] != applied["lr_before"]
    ), res["warmup"]
    # the overflow step: counted once, no parameter touched, the LR schedule not advanced, the scale not raised
    assert forced["skipped"] == 1, forced
    assert not forced["params_moved"], forced
    assert forced["lr_after"] == forced["lr_before"], forced
    if forced["scale_before"] is not None:
        assert forced["scale_after"] <= forced["scale_before"], forced
    # and training goes on normally: applied, finite, parameters move again
    assert after["skipped"] == 0 and after["params_moved"] and after["lr_after"] != after["lr_before"], after
    assert math.isfinite(after["loss"]), after


# ---------------------------------------------------------------- packing on CUDA kernels


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


KERNELS = [
    ("sdpa", torch.float32, 1e-4),
    ("sdpa", torch.bfloat16, 2e-2),
    ("flash_attention_2", torch.bfloat16, 2e-2),
]


@pytest.mark.parametrize("attn,dtype,tol", KERNELS, ids=["sdpa-fp32", "sdpa-bf16", "fa2-bf16"])
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_packed_logits_equal_unpacked_on_gpu(which, attn, dtype, tol, gpt2_dir, llama_dir):
    """Mirror of tests/test_packing.py on CUDA. bf16 logits here are O(1), so 2e-2 is a few bf16 ulps; a leak across
    examples moves them by O(0.5), which the last assertion checks is far outside the tolerance."""
    import torch.nn.functional as F

    from dist_ft.config import ModelConfig
    from dist_ft.data.chat import IGNORE, tokenize_conversation
    from dist_ft.data.formats import to_conversation
    from dist_ft.data.packing import collate_packed, collate_padded
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    if attn == "flash_attention_2" and not _has_flash_attn():
        pytest.skip("flash_attn is not installed")
    cfg = ModelConfig(path=str(gpt2_dir if which == "gpt2" else llama_dir), attn_implementation=attn)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, dtype).to("cuda").eval()
    assert model.config._attn_implementation == attn
    examples = [tokenize_conversation(tok, to_conversation(r, "auto", "r"), "r") for r in tiny.toy_chat(5)]
    packed = collate_packed([examples], 256, tok.pad_token_id)
    cuda = lambda t: t.to("cuda")  # noqa: E731
    with torch.no_grad():
        logits = (
            model(input_ids=cuda(packed.input_ids), position_ids=cuda(packed.position_ids), use_cache=False)
            .logits[0]
            .float()
        )
        start = 0
        for ex in examples:
            alone = collate_padded([ex], tok.pad_token_id)
            ref = model(input_ids=cuda(alone.input_ids), use_cache=False).logits[0].float()
            n = len(ex.input_ids)
            torch.testing.assert_close(logits[start : start + n], ref, atol=tol, rtol=tol)
            l_packed = F.cross_entropy(
                logits[start : start + n], cuda(packed.targets[0, start : start + n]), ignore_index=IGNORE
            )
            l_alone = F.cross_entropy(ref, cuda(alone.targets[0]), ignore_index=IGNORE)
            assert abs(l_packed.item() - l_alone.item()) <= tol * max(1.0, abs(l_alone.item()))
            start += n
        first = len(examples[0].input_ids)
        # plain 0..N positions
        leaky = model(input_ids=cuda(packed.input_ids), use_cache=False).logits[0].float()
        assert (leaky[first:start] - logits[first:start]).abs().max().item() > 5 * tol


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_two_packed_rows_equal_unpacked_with_flash_attention(which, gpt2_dir, llama_dir):
    """Micro batch 2 of packed rows on flash_attention_2: transformers reads restarting position_ids as packing only at
    batch size 1, so the batch's varlen boundaries (`Batch.model_inputs`) must keep every example of every row to itself."""
    from dist_ft.config import ModelConfig
    from dist_ft.data.chat import tokenize_conversation
    from dist_ft.data.formats import to_conversation
    from dist_ft.data.packing import collate_packed, collate_padded
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    if not _has_flash_attn():
        pytest.skip("flash_attn is not installed")
    cfg = ModelConfig(
        path=str(gpt2_dir if which == "gpt2" else llama_dir), attn_implementation="flash_attention_2"
    )
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, torch.bfloat16).to("cuda").eval()
    examples = [tokenize_conversation(tok, to_conversation(r, "auto", "r"), "r") for r in tiny.toy_chat(6)]
    rows, tol = [examples[:3], examples[3:]], 2e-2
    batch = collate_packed(rows, 160, tok.pad_token_id)
    with torch.no_grad():
        logits = model(
            **batch.model_inputs("cuda", model.config._attn_implementation), use_cache=False
        ).logits.float()
        for r, row in enumerate(rows):
            start = 0
            for ex in row:
                ref = (
                    model(
                        input_ids=collate_padded([ex], tok.pad_token_id).input_ids.to("cuda"), use_cache=False
                    )
                    .logits[0]
                    .float()
                )
                torch.testing.assert_close(
                    logits[r, start : start + len(ex.input_ids)], ref, atol=tol, rtol=tol
                )
                start += len(ex.input_ids)
        leaky = model(
            input_ids=batch.input_ids.to("cuda"), position_ids=batch.position_ids.to("cuda"), use_cache=False
        ).logits.float()
        first, end = len(rows[1][0].input_ids), sum(len(ex.input_ids) for ex in rows[1])
        assert (
            leaky[1, first:end] - logits[1, first:end]
        ).abs().max().item() > 5 * tol  # position_ids alone: examples leak


def test_model_load_leaves_the_gpu_generator_alone(gpt2_dir):
    """Loading GPT-2 with LoRA draws new ChatML rows and adapter weights from fixed seeds; this GPU's generator (which
    train.seed set for dropout) must be as it was (torch.manual_seed inside the load used to reseed it to 0)."""
    from dist_ft.config import ModelConfig, PeftConfig
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    cfg = ModelConfig(path=str(gpt2_dir), peft=PeftConfig(r=4))
    tok = load_tokenizer(cfg)
    torch.cuda.manual_seed(1234)
    before = torch.cuda.get_rng_state()
    load_model(cfg, tok, torch.bfloat16)
    assert torch.equal(torch.cuda.get_rng_state(), before)


# ---------------------------------------------------------------- kill + resume, bitwise


def test_resume_after_sigkill_is_bit_exact_bf16_zero2(tmp_path, gpt2_dropout_dir, det_env):
    """Like tests/test_checkpoint.py on the GPU, with dropout 0.1 (masks drawn by the CUDA RNG, which the
    checkpoint must restore). Attention is `eager` here: sdpa's memory-efficient backward on CUDA
    accumulates with atomics (non-deterministic), which would make two uninterrupted runs differ in the last bits,
    so the comparison could not tell a resume bug from kernel noise."""
    from safetensors.torch import load_file

    steps, kill_at = 12, 7
    cfg = tiny.run_config(
        tmp_path,
        gpt2_dropout_dir,
        96,
        f"max_steps: {steps}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
        "precision: bf16, zero_stage: 2",
        "checkpoint: {every_steps: 3}\n",
    )

    def train(out: Path, **env):
        cmd = [
            sys.executable,
            "-m",
            "dist_ft",
            "train",
            str(cfg),
            "model.attn_implementation=eager",
            f"output.dir={out}",
        ]
        # own session: the kill hook SIGKILLs the whole process group, as a node failure would
        return subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **det_env, **env},
            capture_output=True,
            text=True,
            timeout=600,
            start_new_session=True,
        )

    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert_ok(train(ref))
    r = train(out, DIST_FT_TEST_KILL_AT_STEP=str(kill_at))
    assert r.returncode == -signal.SIGKILL and not (out / "final").exists(), (r.returncode, r.stderr[-2000:])
    before_kill = tiny.losses(out)
    assert before_kill == tiny.losses(ref)[:kill_at], (
        "two uninterrupted runs already differ before the kill: the GPU kernels "
        "are not deterministic here, so a bitwise resume cannot be judged"
    )
    r = assert_ok(train(out))
    assert f"resumed from {out / 'checkpoints' / f'step-{kill_at // 3 * 3}'}" in r.stdout
    assert tiny.losses(out) == tiny.losses(ref)
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert {str(v.dtype) for v in wa.values()} == {"torch.bfloat16"}
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


# ---------------------------------------------------------------- ZeRO-3 export == zero_to_fp32


def test_zero3_export_equals_zero_to_fp32_of_final_checkpoint(tmp_path, gpt2_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    steps = 6
    cfg = tiny.run_config(
        tmp_path,
        gpt2_dir,
        96,
        f"max_steps: {steps}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
        "precision: bf16, zero_stage: 3",
        "checkpoint: {every_steps: 3}\n",
    )
    out = tmp_path / "run"
    r = assert_ok(run_cli("train", str(cfg), f"output.dir={out}"))
    assert "world 1 | ZeRO 3 | bf16" in r.stdout
    # the checkpoint of the last step: the export is taken right after it
    step_dir = out / "checkpoints" / f"step-{steps}"
    assert (step_dir / "COMPLETE").is_file()
    # DeepSpeed state lives under tag `ds`
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="ds")
    exported = load_file(out / "final" / "model.safetensors")
    assert exported and set(exported) <= set(fp32), sorted(set(exported) - set(fp32))
    # GPT-2 ties lm_head.weight to transformer.wte.weight: save_pretrained writes the shared tensor once (under wte),
    # zero_to_fp32 restores both names; the alias must be the very same values
    extra = set(fp32) - set(exported)
    assert extra <= {"lm_head.weight"}, sorted(extra)
    if "lm_head.weight" in extra:
        assert torch.equal(fp32["lm_head.weight"], fp32["transformer.wte.weight"])
    for k, v in exported.items():
        ref = fp32[k]
        assert v.shape == ref.shape, k
        if ref.is_floating_point():
            assert v.dtype == torch.bfloat16, (k, v.dtype)
            # the bf16 weights are the fp32 master weights rounded to nearest, bit for bit
            assert torch.equal(v, ref.to(v.dtype)), (k, (v.float() - ref).abs().max().item())
        else:
            assert torch.equal(v, ref), k
    # and training moved the weights (the comparison is not between two untouched initializations)
    k = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(exported[k], load_file(gpt2_dir / "model.safetensors")[k].to(torch.bfloat16))


# ---------------------------------------------------------------- device per rank, loss memory


def test_srun_task_with_one_visible_gpu_and_a_high_local_id(bf16_cfg, tmp_path):
    """`srun --gpus-per-task=1`: task 3 of a node sees only its own GPU, so it must take cuda:0, not cuda:3
    (which does not exist for it). Simulated with one task whose SLURM_LOCALID is 3 and one visible GPU."""
    out = tmp_path / "srun-layout"
    # a lone task with local id 3 is no node's shard builder (local rank 0)
    assert_ok(run_cli("prepare", str(bf16_cfg)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        SLURM_PROCID="0",
        SLURM_NTASKS="1",
        SLURM_LOCALID="3",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
    )
    r = assert_ok(
        subprocess.run(
            [sys.executable, "launch/train.py", str(bf16_cfg), f"output.dir={out}", "train.max_steps=2"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert "rank 0 of 1 (local rank 3)" in r.stdout and "nccl process group" in r.stdout
    assert any("gpu_peak_mb" in rec for rec in metric_records(out))


def test_fused_loss_never_holds_tokens_x_vocab_logits_on_gpu():
    """8,192 loss-bearing positions x a 128k vocabulary: the plain path's fp32 logits alone are 4 GiB; the
    fused, chunked loss must stay far below that (peak over forward + backward), with the same loss."""
    import torch.nn.functional as F

    from dist_ft.loss import linear_cross_entropy

    n, hidden, vocab = 8192, 256, 128_256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    peaks, losses = {}, {}
    for name, fn in (
        ("fused", lambda: linear_cross_entropy(h, w, None, t, 1024)),
        ("plain", lambda: F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")),
    ):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        peaks[name], losses[name] = torch.cuda.max_memory_allocated() - base, loss.item()
    logits_fp32 = n * vocab * 4
    assert peaks["plain"] >= logits_fp32
    assert peaks["fused"] < logits_fp32 / 4, peaks
    assert abs(losses["fused"] - losses["plain"]) / losses["plain"] < 1e-3


def test_activation_offload_keeps_layer_inputs_on_the_host_with_the_same_gradients():
    """model.activation_offload: a 16-layer Llama-shaped model with gradient checkpointing, one 8,192-token row.
    With the offload the layers' saved inputs (8 MiB each here) wait in pinned host memory: the device peak over
    forward + backward drops by at least 8 of them, and the gradients are the same (the copies are exact; the
    attention kernels' backward may differ run to run in the last bits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_ft.offload import activations_on_host

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(
        0, 512, (1, 8192), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)
    )
    peaks, grads = {}, {}
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with activations_on_host(on):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        peaks[on] = torch.cuda.max_memory_allocated() - base
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters()}
    layer_input = 8192 * 256 * 4
    print(f"activation offload: peak {peaks[False] / 2**20:.0f} MiB -> {peaks[True] / 2**20:.0f} MiB")
    assert peaks[True] < peaks[False] - 8 * layer_input, peaks
    assert all(torch.allclose(grads[False][n], grads[True][n], rtol=1e-4, atol=1e-7) for n in grads[False])
