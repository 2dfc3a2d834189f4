"""Model load (dist_ft/model.py, adapters.py) leaves the run's own RNGs alone: the resized embedding rows and a fresh
adapter are the same draws on every load, and `train.seed` still drives dropout on the GPU afterwards."""

import warnings

import torch

from dist_ft.adapters import peft_config
from dist_ft.config import ModelConfig, PeftConfig
from dist_ft.model import load_model, new_tokens
from dist_ft.tokenizer import load_tokenizer


def test_model_load_and_adapters_never_reseed_the_gpu_generators(gpt2_dir, monkeypatch):
    """GPT-2 gains the ChatML rows (the resize draws them) and LoRA draws its A matrices. torch.manual_seed(0) inside
    fork_rng(devices=[]) reseeded every CUDA generator for good; now no CUDA generator is reseeded, the CPU RNG is put
    back, and the weights are bit-identical to what the old seeded load drew."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(path=str(gpt2_dir), peft=PeftConfig(r=4, dropout=0.0))
    tok = load_tokenizer(cfg)
    with (
        torch.random.fork_rng(devices=[]),
        warnings.catch_warnings(),
    ):  # the old way, as the reference for the values
        warnings.simplefilter("ignore")  # peft's notes on deprecated transformers attributes
        ref = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32)
        had = ref.get_input_embeddings().num_embeddings
        torch.manual_seed(0)
        ref.resize_token_embeddings(len(tok))
        torch.manual_seed(0)
        ref = get_peft_model(ref, peft_config(cfg.peft, ref, new_tokens(had, len(tok))))
    assert had < len(tok)  # the resize really draws

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("manual_seed_all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("manual_seed", seed)))
    with torch.random.fork_rng(devices=[]):  # (the suite's own RNG state is left as it was, too)
        torch.default_generator.manual_seed(1234)  # the run's seed (without the spied CUDA calls)
        before = torch.get_rng_state()
        model = load_model(cfg, tok, torch.float32)
        assert torch.equal(torch.get_rng_state(), before)
    assert calls == []
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and any(".lora_A." in k for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
