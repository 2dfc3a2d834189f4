"""Sequence parallelism in the engine (`engine.sequence_parallel` > 1): DeepSpeed's Ulysses attention
registered over the model's kernel, the gradient averaging it implies, and the plain kernel back for other
models. The data side (which rows, which shard) is `sequence_parallel.py`."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from .config import Config
from .errors import UserError
from .sequence_parallel import batch_rows


def register(model, cfg: Config):
    """Sequence parallelism through DeepSpeed's Ulysses attention: registered over the model's own attention
    kernel (every rank computes all positions for 1/sp of the heads, between two all-to-alls); returns the
    sequence-parallel groups for `deepspeed.initialize` and (kernel, its plain function, the wrapper)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sp, config = cfg.engine.sequence_parallel, model.config
    text = config.get_text_config()
    heads = text.num_attention_heads
    if getattr(text, "num_key_value_heads", None) is None:  # GPT-2: multi-head attention, never grouped
        text.num_key_value_heads = heads
    kv = text.num_key_value_heads
    if heads % sp or (kv % sp and sp % kv):
        raise UserError(
            f"engine.sequence_parallel {sp}: the model's {heads} attention heads ({kv} key/value heads) do "
            f"not split over {sp} ranks; choose a sequence_parallel that divides {heads} (and divides or is "
            f"a multiple of {kv})"
        )
    kernel = config._attn_implementation
    plain = ALL_ATTENTION_FUNCTIONS[kernel]
    # Ulysses captures the kernel it calls after its all-to-all: ours splits packed rows into their examples
    ALL_ATTENTION_FUNCTIONS[kernel] = partial(per_example, plain)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=kernel,
        sequence_parallel_size=sp,
        micro_batch_size=batch_rows(cfg),  # (the rows shard() pads every batch to)
        seq_length=cfg.data.max_seq_len,
        seq_length_is_variable=True,
    )
    ulysses = ALL_ATTENTION_FUNCTIONS[kernel]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # Ulysses returns [batch, positions, heads x head_dim]; transformers' kernels return [batch,
        # positions, heads, head_dim], which GPT-2 relies on (it merges the last two dimensions itself)
        out, weights = ulysses(module, query, key, value, attention_mask, *args, **kwargs)
        return out.view(*out.shape[:2], query.shape[1], query.shape[-1]), weights

    ALL_ATTENTION_FUNCTIONS[kernel] = attention
    return mpu, (kernel, plain, attention)


def per_example(kernel, module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
    """`kernel` (transformers' attention function: q/k/v [batch, heads, positions, head_dim] in, [batch,
    positions, heads, head_dim] out) on the whole sequence Ulysses gathered, once per example of a packed row.
    Ulysses drops every mask and attends causally over the row; an example starts wherever the row's
    position_ids do not go on by one (transformers' rule for packed rows at sp=1). Unpacked rows: one call."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    if position_ids is None:
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not starts.any():
        return kernel(module, query, key, value, attention_mask, *args, position_ids=position_ids, **kwargs)
    rows, weights = [], None
    for r in range(query.shape[0]):
        cut = [0, *(torch.nonzero(starts[r]).squeeze(1) + 1).tolist(), query.shape[2]]
        parts = []
        for a, b in zip(cut, cut[1:], strict=False):
            piece = (slice(r, r + 1), slice(None), slice(a, b))
            out, weights = kernel(
                module,
                query[piece],
                key[piece],
                value[piece],
                None,
                *args,
                position_ids=position_ids[r : r + 1, a:b],
                **kwargs,
            )
            parts.append(out)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def sequence_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` all-reduced (summed) over the sequence-parallel group DeepSpeed's Ulysses set up, with autograd."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, group=groups.get_sequence_parallel_group())


def ranks_averaged(zero_stage: int, sp: int) -> int:
    """Over how many ranks DeepSpeed averages the gradients: every rank, except under sequence parallelism,
    where the ranks of a group hold parts of one sequence's gradient and are summed, the average running over
    the data-parallel groups - at ZeRO 0-2. ZeRO-3's reduce-scatter divides by the whole world before
    DeepSpeed 0.20.2 (transformers scales its loss by sp there for the same reason)."""
    import deepspeed
    from packaging.version import Version

    world = torch.distributed.get_world_size()
    if sp > 1 and not (zero_stage == 3 and Version(deepspeed.__version__) < Version("0.20.2")):
        return world // sp
    return world


@contextmanager
def plain_attention(attention):
    """Inside the block the attention kernel is the plain one again (Ulysses' wrapper replaces it for the
    whole process); `attention` is `register`'s (kernel, plain, wrapper), or None (nothing to do)."""
    if attention is None:
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kernel, plain, wrapped = attention
    ALL_ATTENTION_FUNCTIONS[kernel] = plain
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS[kernel] = wrapped


def tile_mlps(model, tiles: int) -> int:
    """Every decoder layer's MLP (a module named `mlp`) runs through DeepSpeed's TiledMLP (ALST): forward over
    `tiles` slices of the sequence without keeping their wide intermediate activations, backward recomputing
    one slice at a time. Returns how many MLPs were tiled (0: the model has none by that name)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    n = 0
    for name, mlp in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or "forward" in vars(mlp):
            continue
        plain = type(mlp).forward
        params = [p for p in mlp.parameters() if p.requires_grad]

        def tiled(x, mlp=mlp, plain=plain, params=params):
            # the slices torch.chunk really makes (fewer than asked when the sequence is short): TiledMLP
            # marks the gradients ready only at the last of the count it is given
            n = len(x.chunk(tiles, dim=-2))
            return TiledMLP.apply(plain, mlp, x, n, params)

        mlp.forward = tiled
        n += 1
    return n
