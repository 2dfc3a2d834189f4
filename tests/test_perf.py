"""Executed FLOPs for MFU (dist_ft/perf.py), against a hand count for GPT-2 124M: full fine-tuning and LoRA."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dist_ft.adapters import wrap
from dist_ft.config import PeftConfig
from dist_ft.data.chat import IGNORE, Example
from dist_ft.data.packing import collate_packed, collate_padded
from dist_ft.perf import FlopCount

# GPT-2 124M: d = 768, L = 12 layers, 12 heads x 64, vocab V = 50,257. Matmul weights per layer (Conv1D, biases are
# not matmuls): c_attn 768 x 2304 = 1,769,472; attn.c_proj 768 x 768 = 589,824; mlp.c_fc 768 x 3072 = 2,359,296;
# mlp.c_proj 3072 x 768 = 2,359,296; together 7,077,888, x 12 layers = 84,934,656 = N_mm. The tied output layer
# N_head = 50,257 x 768 = 38,597,376. The input embeddings (wte, wpe) are lookups: not counted.
N_MM, N_HEAD = 84_934_656, 38_597_376
# LoRA r = 8 on c_attn, c_proj (both), c_fc: A (in x 8) + B (8 x out) per target: c_attn 6,144 + 18,432 = 24,576;
# attn.c_proj 6,144 + 6,144 = 12,288; c_fc 6,144 + 24,576 = 30,720; mlp.c_proj 24,576 + 6,144 = 30,720;
# 98,304 per layer, x 12 = 1,179,648 trainable matmul weights, run at every token on top of the frozen N_mm.
N_LORA = 1_179_648

# The batch: two examples of 300 and 700 tokens packed in one 1024-token row (24 padding), with 100 + 300 = 400
# loss positions. Attention pairs (causal: position i attends to i + 1 keys): 300*301/2 + 700*701/2 = 45,150 +
# 245,350 = 290,500; each 4 * L * d = 4 * 12 * 768 = 36,864 FLOPs forward (q.k and p.v), x 3 with backward:
ATTN = 3 * 36_864 * 290_500  # = 32,126,976,000
# Full fine-tuning: matmuls 2 N_mm forward + 2 N_mm activation grads + 2 N_mm weight grads per token:
#   6 x 84,934,656 x 1,000 = 509,607,936,000; output layer, at the 400 loss positions only, the same three terms:
#   6 x 38,597,376 x 400 = 92,633,702,400; total 509,607,936,000 + 92,633,702,400 + 32,126,976,000:
FULL = 634_368_614_400
# LoRA: every matmul forward and activation grads, 4 x (84,934,656 + 1,179,648) x 1,000 = 344,457,216,000, weight
#   grads for the adapters only, 2 x 1,179,648 x 1,000 = 2,359,296,000; the frozen output layer forward + activation
#   grads, 4 x 38,597,376 x 400 = 61,755,801,600; total 344,457,216,000 + 2,359,296,000 + 61,755,801,600 + 32,126,976,000:
LORA = 440_699_289_600


def _gpt2_124m():
    with torch.device("meta"):  # shapes only: no weights are allocated
        return GPT2LMHeadModel(GPT2Config())


def _examples() -> list[Example]:
    return [Example([1] * 300, [IGNORE] * 200 + [1] * 100), Example([1] * 700, [IGNORE] * 400 + [1] * 300)]


def test_flops_of_gpt2_124m_full_fine_tuning_by_hand():
    fc = FlopCount.of(_gpt2_124m())
    assert (fc.matmul, fc.matmul_trainable, fc.head, fc.head_trainable) == (N_MM, N_MM, N_HEAD, N_HEAD)
    assert (fc.layers, fc.attn_width, fc.prefix) == (12, 768, 0)
    packed = collate_packed([_examples()], 1024, 0)
    assert (packed.n_tokens, packed.loss_index.numel(), packed.lengths) == (1000, 400, (300, 700))
    assert fc.batch_flops(packed) == ATTN + 509_607_936_000 + 92_633_702_400 == FULL
    assert fc.per_token([packed, packed]) == FULL / 1000
    assert fc.batch_flops(collate_padded(_examples(), 0)) == FULL  # padding is not work done: the same count


def test_flops_of_gpt2_124m_lora_by_hand():
    model = wrap(_gpt2_124m(), PeftConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]), [])
    fc = FlopCount.of(model)
    assert (fc.matmul, fc.matmul_trainable, fc.head, fc.head_trainable) == (N_MM + N_LORA, N_LORA, N_HEAD, 0)
    assert (
        fc.batch_flops(collate_packed([_examples()], 1024, 0))
        == 344_457_216_000 + 2_359_296_000 + 61_755_801_600 + ATTN
        == LORA
    )
