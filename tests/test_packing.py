"""Packing: per-example logits/loss in a packed row equal the example run alone (fp32, 1e-5)."""

import random

import pytest
import torch
import torch.nn.functional as F

from dist_ft.config import ModelConfig
from dist_ft.data.chat import IGNORE, Example, tokenize_conversation
from dist_ft.data.formats import to_conversation
from dist_ft.data.packing import collate_packed, collate_padded, pack
from dist_ft.model import load_model
from dist_ft.tokenizer import load_tokenizer
import tiny


def test_pack_is_a_valid_partition():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack(lengths, 128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 128 + 1  # best-fit decreasing stays close to the bound


def test_targets_never_cross_examples():
    a, b = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [IGNORE, 5])
    batch = collate_packed([[a, b]], 8, 0)
    assert batch.targets[0].tolist() == [2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch.n_tokens == 5 and batch.n_loss == 3


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_packed_logits_equal_unpacked(which, gpt2_dir, llama_dir):
    path = gpt2_dir if which == "gpt2" else llama_dir
    cfg = ModelConfig(path=str(path))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, torch.float32).eval()
    examples = [tokenize_conversation(tok, to_conversation(r, "auto", "r"), "r") for r in tiny.toy_chat(5)]
    packed = collate_packed([examples], 256, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        start = 0
        for ex in examples:
            alone = collate_padded([ex], tok.pad_token_id)
            ref = model(input_ids=alone.input_ids, use_cache=False).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(logits[start:start + n], ref, atol=1e-5, rtol=1e-5)
            l_packed = F.cross_entropy(logits[start:start + n], packed.targets[0, start:start + n], ignore_index=IGNORE)
            l_alone = F.cross_entropy(ref, alone.targets[0], ignore_index=IGNORE)
            assert abs(l_packed.item() - l_alone.item()) < 1e-5
            start += n
        # sanity: the same row with plain 0..N positions (cross-attention allowed) really differs
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits[0]
        assert not torch.allclose(leaky[len(examples[0].input_ids):start], logits[len(examples[0].input_ids):start], atol=1e-3)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [0, 5, 4096])
def test_loss_on_loss_bearing_positions_only_equals_full_logits_loss(which, chunk, gpt2_dir, llama_dir):
    """loss.token_loss_sum runs the output layer only where targets carry loss, fused with the loss in chunks of
    `chunk` positions (0: plain cross-entropy on those logits); loss and every gradient must equal the plain
    full-logits cross-entropy (GPT-2 ties its output layer to the input embeddings: both gradients meet)."""
    from dist_ft.loss import token_loss_sum as loss_sum

    cfg = ModelConfig(path=str(gpt2_dir if which == "gpt2" else llama_dir))
    tok = load_tokenizer(cfg)
    examples = [tokenize_conversation(tok, to_conversation(r, "auto", "r"), "r") for r in tiny.toy_chat(6)]
    batch = collate_packed([examples[:3], examples[3:]], 160, tok.pad_token_id)  # 2 rows, with padding
    model = load_model(cfg, tok, torch.float32)
    ours = loss_sum(model, batch, chunk)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    assert logits.shape[:2] == batch.input_ids.shape  # the hook is gone after loss_sum
    ref = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
    ref.backward()
    assert 0 < (batch.targets != IGNORE).sum() < batch.targets.numel() / 2  # the case it is for
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-6)
    for n, p in model.named_parameters():  # gradients of the summed loss over ~70 tokens
        torch.testing.assert_close(g_ours[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
