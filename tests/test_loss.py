"""The fused, chunked output layer + cross-entropy (dist_ft/loss.py) against the plain computation."""

import pytest
import torch
import torch.nn.functional as F

from dist_ft.loss import linear_cross_entropy

N, H, V = 300, 32, 1000


def _inputs(bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t


def _grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 0])
def test_chunked_loss_and_grads_equal_unchunked_in_fp32(bias, chunk):
    """Mean loss over the positions (what training backpropagates) and the gradients of h, W and b agree
    with F.cross_entropy on the whole fp32 logits to 1e-6."""
    h, w, b, t = _inputs(bias)
    ours = linear_cross_entropy(h, w, b, t, chunk) / N
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum") / N
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    for g_ours, g_ref in zip(_grads(ours, (h, w, b)), _grads(ref, (h, w, b)), strict=False):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-6)


def test_upstream_gradient_scales_every_gradient():
    h, w, b, t = _inputs(True)
    ours = _grads(linear_cross_entropy(h, w, b, t, 50) * 0.37, (h, w, b))
    ref = _grads(F.cross_entropy(F.linear(h, w, b), t, reduction="sum") * 0.37, (h, w, b))
    for a, r in zip(ours, ref, strict=False):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)


def test_bf16_close_to_plain_and_grads_in_model_dtype():
    h, w, b, t = _inputs(False, torch.bfloat16)
    ours = linear_cross_entropy(h, w, None, t, 64)
    ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=0)
    g_h, g_w = _grads(ours, (h, w))
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    r_h, r_w = _grads(ref, (h, w))
    torch.testing.assert_close(g_w.float(), r_w.float(), atol=0.1, rtol=0.02)  # bf16 has 8 mantissa bits


def test_no_tokens_x_vocab_tensor_is_kept_for_backward():
    """What autograd keeps between forward and backward: the plain path keeps the N x V logits (and their
    log-softmax); the fused path keeps only N x H and V x H gradients."""
    h, w, b, t = _inputs(True)
    kept = []

    def pack(x):
        kept.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    assert max(kept) >= N * V
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        linear_cross_entropy(h, w, b, t, 64)
    assert kept and max(kept) == V * H < N * V


def test_eval_without_grad_computes_no_gradients():
    h, w, b, t = _inputs(True)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, b, t, 64)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    torch.testing.assert_close(loss, ref.detach(), atol=1e-4, rtol=1e-6)
    assert not loss.requires_grad
