"""Parameter-efficient fine-tuning (model.peft): LoRA's algebra on real peft layers (GPT-2's Conv1D and Llama's
Linear), then whole runs: only the adapter trains and is checkpointed, resume is bit-exact after SIGKILL and
refused on another base, ZeRO-3 on 2 ranks equals ZeRO-0 on 1, the export holds the merged model and the adapter,
and prefix tuning trains and answers through dist-ft chat."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from test_checkpoint import _cmd, _run
import tiny

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
    text = tok.apply_chat_template([{"role": "user", "content": "what color is the sky?"}], add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok(text)["input_ids"]])


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_lora_starts_as_the_base_and_trains_only_adapters(which, gpt2_dir, llama_dir):
    path = {"gpt2": gpt2_dir, "llama": llama_dir}[which]
    tok, base = _load(path, wrap=False)
    _, lora = _load(path, dropout=0.0)
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, lora(input_ids=ids).logits)  # B = 0: the adapter adds exactly nothing
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n or "trainable_tokens" in n for n in trainable), trainable
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert targets == ({"c_attn", "c_proj", "c_fc"} if which == "gpt2" else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


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
    new = list(range(len(tok) - 5, len(tok)))  # ChatML's tokens the tiny GPT-2 gained: rows trained as a delta
    ids = torch.cat([ids, torch.tensor([new])], dim=1)
    _, hand = _load(gpt2_dir, wrap=False)
    params = dict(hand.named_parameters())
    with torch.no_grad():
        for name, mod in lora.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                delta = (8.0 / 4) * mod.lora_B["default"].weight @ mod.lora_A["default"].weight  # (out, in)
                params[name.removeprefix("base_model.model.") + ".weight"].add_(delta.T)  # Conv1D weight is (in, out)
            if hasattr(mod, "trainable_tokens_delta") and "default" in mod.trainable_tokens_delta:
                idx = torch.tensor(mod.token_indices["default"])
                params["transformer.wte.weight"][idx] = mod.trainable_tokens_delta["default"]
        want = hand(input_ids=ids).logits
        got = lora(input_ids=ids).logits
        merged = copy.deepcopy(lora).merge_and_unload()(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-5 and (want - merged).abs().max() < 1e-5, ((want - got).abs().max(), (want - merged).abs().max())
    with torch.no_grad():
        base = _load(gpt2_dir, wrap=False)[1](input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter does change the model
