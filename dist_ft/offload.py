"""`model.activation_offload`: what autograd keeps from the forward for backward lives in pinned host
memory between the two (ALST's activation-checkpoint offload). With gradient checkpointing that is each
decoder layer's input - the one activation per layer that grows with the sequence - so device memory holds
one layer's worth at a time. torch's `save_on_cpu` does the same for every saved tensor; this one leaves out
the parameters (saved by every matmul outside the checkpointed layers, e.g. the output layer: copying a
vocabulary-sized weight to the host every step buys nothing) and small tensors. Copies are exact: the values
backward sees are unchanged."""

from __future__ import annotations

from contextlib import contextmanager

import torch

SMALLEST = 1 << 20  # bytes: below this a tensor stays where it is


def _pack(t: torch.Tensor):
    if t.device.type == "cpu" or isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < SMALLEST:
        return t
    host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
    host.copy_(t, non_blocking=True)  # ordered on the stream before anything reuses t's memory
    return t.device, host


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


@contextmanager
def activations_on_host(on: bool):
    """`with activations_on_host(True):` the forward inside saves its large activations to host memory."""
    if not on:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
