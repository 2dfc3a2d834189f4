"""Packing: per-example logits/loss in a packed row equal the example run alone (fp32, 1e-5)."""

import random

import pytest
import tiny
import torch
import torch.nn.functional as F

from dist_ft.config import ModelConfig
from dist_ft.data.chat import IGNORE, Example, tokenize_conversation
from dist_ft.data.formats import to_conversation
from dist_ft.data.packing import collate_packed, collate_padded, pack
from dist_ft.model import load_model
from dist_ft.tokenizer import load_tokenizer


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
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[
            0
        ]
        start = 0
        for ex in examples:
            alone = collate_padded([ex], tok.pad_token_id)
            ref = model(input_ids=alone.input_ids, use_cache=False).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(logits[start : start + n], ref, atol=1e-5, rtol=1e-5)
            l_packed = F.cross_entropy(
                logits[start : start + n], packed.targets[0, start : start + n], ignore_index=IGNORE
            )
            l_alone = F.cross_entropy(ref, alone.targets[0], ignore_index=IGNORE)
            assert abs(l_packed.item() - l_alone.item()) < 1e-5
            start += n
        # sanity: the same row with plain 0..N positions (cross-attention allowed) really differs
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits[0]
        assert not torch.allclose(
            leaky[len(examples[0].input_ids) : start], logits[len(examples[0].input_ids) : start], atol=1e-3
        )


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


# ---------------------------------------------------------------- flash-attention: packed rows at micro batch > 1


def _cpu_flash(calls: list):
    """flash_attention_2's choice of kernel (transformers' `_flash_attention_forward`), on CPU, recording what reaches it:
    varlen over the flattened rows when `cu_seq_lens_q/k` are passed, else boundaries from restarting position_ids
    only at batch size 1 (`_is_packed_sequence`), else plain causal attention over each whole row."""
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    def attend(
        module,
        q,
        k,
        v,
        mask,
        dropout=0.0,
        scaling=None,
        position_ids=None,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
        **kw,
    ):
        b, h, n, d = q.shape  # [rows, heads, width, head dim]
        calls.append(
            {
                "cu_q": None if cu_seq_lens_q is None else cu_seq_lens_q.tolist(),
                "cu_k": None if cu_seq_lens_k is None else cu_seq_lens_k.tolist(),
                "max_q": max_length_q,
                "max_k": max_length_k,
                "dtype": None if cu_seq_lens_q is None else cu_seq_lens_q.dtype,
            }
        )
        if cu_seq_lens_q is not None:
            cu = cu_seq_lens_q.long()
        elif _is_packed_sequence(position_ids, b):
            cu = prepare_fa_kwargs_from_position_ids(position_ids)[0][0].long()
        else:
            cu = torch.arange(0, b * n + 1, n)
        seg = torch.zeros(b * n, dtype=torch.long).index_fill_(0, cu[1:-1], 1).cumsum(0)
        i = torch.arange(b * n)
        allowed = (seg[:, None] == seg[None, :]) & (i[:, None] >= i[None, :])
        flat = lambda t: t.repeat_interleave(h // t.shape[1], dim=1).transpose(0, 1).reshape(h, b * n, d)  # noqa: E731
        out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=allowed, scale=scaling)
        return out.reshape(h, b, n, d).permute(1, 2, 0, 3), None

    return attend


def test_packed_rows_carry_the_varlen_boundaries_of_every_example():
    a, b, c = (
        Example([1, 2, 3], [1, 2, 3]),
        Example([4, 5], [IGNORE, 5]),
        Example([6, 7, 8, 9, 10, 11], [6] * 6),
    )
    batch = collate_packed([[a, b], [c]], 8, 0)
    assert batch.cu_seq_lens.dtype == torch.int32
    assert batch.cu_seq_lens.tolist() == [
        0,
        3,
        5,
        8,
        14,
        16,
    ]  # row 0: a, b, padding; row 1 (from 8): c, padding
    assert batch.max_length == 6 and batch.lengths == (3, 2, 6)
    assert "cu_seq_lens_q" not in batch.model_inputs(
        "cpu", "sdpa"
    ) and "cu_seq_lens_q" not in batch.model_inputs("cpu", "eager")
    kw = batch.model_inputs("cpu", "flash_attention_2")
    assert kw["cu_seq_lens_q"].tolist() == kw["cu_seq_lens_k"].tolist() == [0, 3, 5, 8, 14, 16]
    assert kw["max_length_q"] == kw["max_length_k"] == 6 and isinstance(kw["max_length_q"], int)
    assert collate_packed([[c]], 6, 0).cu_seq_lens.tolist() == [0, 6]  # a full row has no padding segment


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_flash_attention_sees_every_packed_example_of_every_row(which, gpt2_dir, llama_dir, monkeypatch):
    """Micro batch 2 of packed rows through the loss's forward (loss.token_loss_sum) with flash_attention_2: transformers
    finds packed rows from position_ids only at batch size 1, so the boundaries must reach the attention function, in
    every layer, describing each example of each row; then the summed loss equals the examples' losses run alone."""
    from transformers.modeling_utils import AttentionInterface

    from dist_ft.loss import token_loss_sum

    calls: list = []
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", _cpu_flash(calls))
    cfg = ModelConfig(path=str(gpt2_dir if which == "gpt2" else llama_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, torch.float32).eval()
    model.config._attn_implementation = (
        "flash_attention_2"  # flash-attn itself needs CUDA: its kernel choice runs above
    )
    examples = [tokenize_conversation(tok, to_conversation(r, "auto", "r"), "r") for r in tiny.toy_chat(6)]
    rows, width = [examples[:3], examples[3:]], 160
    cu = [0]
    for r, row in enumerate(rows):
        for ex in row:
            cu.append(cu[-1] + len(ex.input_ids))
        assert cu[-1] < (r + 1) * width  # each row ends in padding
        cu.append((r + 1) * width)
    expected = {
        "cu_q": cu,
        "cu_k": cu,
        "max_q": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "dtype": torch.int32,
    }
    expected["max_k"] = expected["max_q"]
    batch = collate_packed(rows, width, tok.pad_token_id)
    with torch.no_grad():
        packed = token_loss_sum(model, batch, 0)
        assert len(calls) == model.config.num_hidden_layers and all(c == expected for c in calls), (
            calls[:1],
            expected,
        )
        alone = sum(
            token_loss_sum(model, collate_packed([[ex]], len(ex.input_ids), tok.pad_token_id), 0)
            for ex in examples
        )
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
