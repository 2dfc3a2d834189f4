"""Parameter-efficient fine-tuning (model.peft): LoRA's algebra on real peft layers (GPT-2's Conv1D and Llama's
Linear), then whole runs: only the adapter trains and is checkpointed, resume is bit-exact after SIGKILL and
refused on another base, ZeRO-3 on 2 ranks equals ZeRO-0 on 1, the export holds the merged model and the adapter,
and prefix tuning trains and answers through dist-ft chat."""

import copy
import json
from pathlib import Path

import pytest
import tiny
import torch
from helpers import run_cli, run_cmd, train_cmd
from safetensors.torch import load_file

STEPS = 8
LORA = ("model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8")


def _load(model_dir: Path, wrap: bool = True, **peft):
    from dist_ft.config import ModelConfig, PeftConfig
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    mc = ModelConfig(path=str(model_dir), peft=PeftConfig(**peft))
    tok = load_tokenizer(mc)
    return tok, load_model(mc, tok, adapters=wrap).eval()


def _ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template(
        [{"role": "user", "content": "what color is the sky?"}], add_generation_prompt=True, tokenize=False
    )
    return torch.tensor([tok(text)["input_ids"]])


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_lora_starts_as_the_base_and_trains_only_adapters(which, gpt2_dir, llama_dir):
    path = {"gpt2": gpt2_dir, "llama": llama_dir}[which]
    tok, base = _load(path, wrap=False)
    _, lora = _load(path, dropout=0.0)
    ids = _ids(tok)
    with torch.no_grad():
        # B = 0: the adapter adds exactly nothing
        assert torch.equal(base(input_ids=ids).logits, lora(input_ids=ids).logits)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(
        ".lora_A." in n or ".lora_B." in n or "trainable_tokens" in n for n in trainable
    ), trainable
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert targets == (
        {"c_attn", "c_proj", "c_fc"}
        if which == "gpt2"
        else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )


def test_adapter_equals_merged_equals_hand_merged(gpt2_dir):
    """Non-zero B and new-token rows, dropout 0: the adapter's logits, peft's merge_and_unload() and W + (alpha/r) B A
    written into a fresh base by hand (transposed: GPT-2's Conv1D stores weights (in, out)) agree within 1e-5."""
    tok, lora = _load(gpt2_dir, r=4, alpha=8.0, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if ".lora_B." in n or "trainable_tokens" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = _ids(tok)
    # ChatML's tokens the tiny GPT-2 gained: rows trained as a delta
    new = list(range(len(tok) - 5, len(tok)))
    ids = torch.cat([ids, torch.tensor([new])], dim=1)
    _, hand = _load(gpt2_dir, wrap=False)
    params = dict(hand.named_parameters())
    with torch.no_grad():
        for name, mod in lora.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                delta = (8.0 / 4) * mod.lora_B["default"].weight @ mod.lora_A["default"].weight  # (out, in)
                # Conv1D weight is (in, out)
                params[name.removeprefix("base_model.model.") + ".weight"].add_(delta.T)
            if hasattr(mod, "trainable_tokens_delta") and "default" in mod.trainable_tokens_delta:
                idx = torch.tensor(mod.token_indices["default"])
                params["transformer.wte.weight"][idx] = mod.trainable_tokens_delta["default"]
        want = hand(input_ids=ids).logits
        got = lora(input_ids=ids).logits
        merged = copy.deepcopy(lora).merge_and_unload()(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-5 and (want - merged).abs().max() < 1e-5, (
        (want - got).abs().max(),
        (want - merged).abs().max(),
    )
    with torch.no_grad():
        base = _load(gpt2_dir, wrap=False)[1](input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter does change the model


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    """A private copy of the tiny GPT-2 (a test changes it on disk) and a LoRA run config on the toy set."""
    tmp = tmp_path_factory.mktemp("peft")
    base = tiny.make_gpt2(tmp / "base")
    return tiny.run_config(
        tmp,
        base,
        96,
        f"max_steps: {STEPS}, micro_batch_size: 2, lr: 1.0e-2, warmup_steps: 2",
        "precision: fp32",
        "checkpoint: {every_steps: 3}\ntrack: {wandb: disabled}\n",
    )


def _adapter(out: Path) -> dict:
    return load_file(out / "final" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def lora_run(run_cfg) -> Path:
    out = run_cfg.parent / "lora"
    r = run_cmd(train_cmd(run_cfg, out, 1, "engine.zero_stage=0", *LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| model states per rank:" in r.stdout
    return out


def test_lora_run_checkpoints_only_the_adapter_and_exports_merged_and_adapter(lora_run, run_cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dist_ft.inference import load

    base_dir = run_cfg.parent / "base"
    log = (lora_run / "metrics.jsonl").read_text()
    assert '"mem_formula_optimizer_bytes"' in log
    # the checkpoint holds the adapter and its optimizer state, not the frozen base: far less than the base alone
    ckpt = lora_run / "checkpoints" / f"step-{STEPS}"
    ds_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    assert ds_bytes < (base_dir / "model.safetensors").stat().st_size / 2, ds_bytes
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert len(manifest["base_sha256"]) == 64
    # trained: lora_B moved off zero; the adapter reloads on a fresh base and equals the merged export
    adapter = _adapter(lora_run)
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in adapter.items())
    tok, merged = load(str(lora_run / "final"))
    _, applied = load(str(base_dir), adapter=str(lora_run / "final" / "adapter"))
    plain = AutoModelForCausalLM.from_pretrained(lora_run / "final").eval()
    ids = _ids(tok)
    with torch.no_grad():
        a, b, c = merged(input_ids=ids).logits, applied(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-5 and torch.equal(a, c)
    assert isinstance(applied, PeftModel)
    r = run_cli(
        "chat",
        "--model",
        str(base_dir),
        "--adapter",
        str(lora_run / "final" / "adapter"),
        "--prompt",
        "what color is the sky?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    )
    r2 = run_cli(
        "chat",
        "--model",
        str(lora_run / "final"),
        "--prompt",
        "what color is the sky?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    )
    assert (
        r.returncode == 0
        and r2.returncode == 0
        and r.stdout.strip().splitlines()[-1] == r2.stdout.strip().splitlines()[-1]
    )


def test_lora_resume_after_sigkill_is_bit_exact_and_refused_on_another_base(lora_run, run_cfg):
    out = run_cfg.parent / "lora-killed"
    r = run_cmd(train_cmd(run_cfg, out, 1, "engine.zero_stage=0", *LORA), {"DIST_FT_TEST_KILL_AT_STEP": "5"})
    assert r.returncode != 0 and (out / "checkpoints" / "step-3").is_dir()
    # the base changes on disk under the run: the adapter checkpoint must not continue on it
    with tiny.weights_changed_on_disk(run_cfg.parent / "base"):
        r = run_cmd(train_cmd(run_cfg, out, 1, "engine.zero_stage=0", *LORA))
        assert (
            r.returncode == 2
            and "the base model's weights (sha256" in r.stderr
            and "differ from those this checkpoint was trained on" in r.stderr
        )
    r = run_cmd(train_cmd(run_cfg, out, 1, "engine.zero_stage=0", *LORA))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert tiny.losses(out) == tiny.losses(lora_run)
    a, b = _adapter(lora_run), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lora_one_rank(run_cfg) -> Path:
    """Without dropout (its masks differ per rank layout): the reference for the multi-rank runs."""
    out = run_cfg.parent / "lora-zero0-1"
    r = run_cmd(train_cmd(run_cfg, out, 1, "engine.zero_stage=0", "model.peft.dropout=0", *LORA))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_two_ranks_equal_one_rank(lora_one_rank, run_cfg, stage):
    """The same global batch on 2 ranks: the adapter saved from ZeRO-2/3 partitions is whole and equals the one-rank
    ZeRO-0 adapter up to reduction order."""
    two = run_cfg.parent / f"lora-zero{stage}-2"
    r = run_cmd(
        train_cmd(
            run_cfg,
            two,
            2,
            f"engine.zero_stage={stage}",
            "train.micro_batch_size=1",
            "model.peft.dropout=0",
            *LORA,
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _adapter(lora_one_rank), _adapter(two)
    assert a.keys() == b.keys() and all(b[k].shape == a[k].shape and b[k].numel() > 0 for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 2e-5, worst
    print(f"LoRA ZeRO-{stage} x2 vs ZeRO-0 x1: max |adapter diff| {worst:.2e}")


def test_prefix_tuning_trains_exports_and_answers(run_cfg, tmp_path):
    """Prefix tuning cannot merge: final/ holds the base and final/adapter the virtual tokens, which dist-ft chat
    applies by itself; its answer is the greedy decode through the prefix, and the prefix does change the logits."""
    from dist_ft.inference import load

    out = tmp_path / "prefix"
    r = run_cmd(
        train_cmd(
            run_cfg,
            out,
            1,
            "model.peft.method=prefix",
            "model.peft.num_virtual_tokens=4",
            "data.packing=false",
            "train.max_steps=24",
            "train.lr=0.1",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    losses = tiny.losses(out)
    assert losses[-1] < losses[0] - 0.1, losses  # (a random tiny base: virtual tokens alone move it slowly)
    conf = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PREFIX_TUNING" and conf["num_virtual_tokens"] == 4
    tok, model = load(str(out / "final"))
    assert type(model).__name__.startswith("PeftModel")
    ids = _ids(tok)
    with torch.no_grad():
        cur = ids
        # greedy, one full forward (prefix included) per token, stopping at the end of the turn
        for _ in range(6):
            nxt = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[0, -1].argmax().view(1, 1)
            if nxt.item() in tok.convert_tokens_to_ids(["<|im_end|>"]):
                break
            cur = torch.cat([cur, nxt], 1)
        with_prefix = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert (with_prefix - without).abs().max() > 1e-3
    want = tok.decode(cur[0, ids.shape[1] :], skip_special_tokens=True).strip()
    r = run_cli(
        "chat",
        "--model",
        str(out / "final"),
        "--prompt",
        "what color is the sky?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    )
    assert r.returncode == 0 and r.stdout.rstrip("\n").split("\n")[-1] == want, (
        r.stdout,
        want,
        r.stderr[-2000:],
    )


def test_lora_export_is_byte_for_byte_reproducible(run_cfg, tmp_path):
    """The same LoRA run exported under two PYTHONHASHSEED values (peft keeps target_modules in a set, whose order
    follows the string hash): every file of final/ (merged model, configs, tokenizer, adapter) is byte for byte the same."""
    finals = []
    for seed in ("0", "1"):  # (before the fix these two wrote target_modules in two different orders)
        out = tmp_path / f"seed-{seed}"
        r = run_cmd(
            train_cmd(
                run_cfg, out, 1, "engine.zero_stage=0", "train.max_steps=2", "checkpoint.every_steps=0", *LORA
            ),
            {"PYTHONHASHSEED": seed},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        finals.append(out / "final")
    files = [sorted(str(p.relative_to(f)) for p in f.rglob("*") if p.is_file()) for f in finals]
    assert files[0] == files[1] and "adapter/adapter_config.json" in files[0], files
    differ = [rel for rel in files[0] if (finals[0] / rel).read_bytes() != (finals[1] / rel).read_bytes()]
    assert not differ, differ
    conf = json.loads((finals[0] / "adapter" / "adapter_config.json").read_text())
    assert conf["target_modules"] == sorted(conf["target_modules"])
