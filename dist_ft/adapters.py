"""Parameter-efficient fine-tuning with `peft`: LoRA or prefix-tuning adapters around a loaded model, a
fingerprint of the frozen base (checkpoints hold only the trainable state, so a resume must find the very
same base), and the export: the adapter in PEFT format plus the merged full model, built on CPU in fp32 from a
fresh copy of the base (never inside a ZeRO-3 engine, where weights are partitioned).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from .config import PeftConfig
from .errors import UserError

# final/adapter: the adapter alone, for PeftModel.from_pretrained / dist-ft chat --adapter
ADAPTER_DIR = "adapter"
_TASK_TYPES = {"AutoModelForCausalLM": "CAUSAL_LM", "AutoModelForSequenceClassification": "SEQ_CLS"}


@contextlib.contextmanager
def fixed_draws(seed: int = 0):
    """Random draws inside come from generators seeded with `seed` (the CPU's, and this rank's GPU's once CUDA
    is up: ZeRO-3 resizes embeddings on the GPU), and every generator is put back after. Not
    `torch.manual_seed`: that reseeds every CUDA generator, which `fork_rng(devices=[])` does not restore, so
    `train.seed` would stop driving GPU dropout."""
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        # what torch.manual_seed does on the CPU: the same draws as ever
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


def peft_config(cfg: PeftConfig, model, new_tokens: list[int], auto_class: str = "AutoModelForCausalLM"):
    """The `peft` config for `cfg` on `model`. `auto` targets every linear / Conv1D projection but the output
    head (peft's "all-linear"); GPT-2's Conv1D stores weights transposed (fan_in_fan_out). `new_tokens`:
    embedding rows the tokenizer added, trained as a sparse delta so the chat template's markers are
    learned."""
    from peft import LoraConfig, PrefixTuningConfig

    task_type = _TASK_TYPES[auto_class]
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    return LoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft says int, but only divides: alpha / r
        lora_dropout=cfg.dropout,
        fan_in_fan_out=conv1d,
        target_modules="all-linear" if cfg.target_modules == "auto" else list(cfg.target_modules),
        # None is peft's default: no embedding rows trained
        trainable_token_indices=list(new_tokens) if new_tokens and cfg.train_new_tokens else None,
    )


def wrap(model, cfg: PeftConfig, new_tokens: list[int], auto_class: str = "AutoModelForCausalLM"):
    """`model` inside a PeftModel: only the adapter (and the new tokens' rows) require grad."""
    import warnings

    from peft import get_peft_model

    conf = peft_config(cfg, model, new_tokens, auto_class)
    try:
        # the same initial adapter on every rank, ZeRO stage and load
        with warnings.catch_warnings(), fixed_draws(0):
            warnings.simplefilter("ignore")  # peft's notes on deprecated transformers attributes
            return get_peft_model(model, conf)
    except ValueError as e:
        names = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if type(m).__name__ in ("Linear", "Conv1D")
            }
        )
        raise UserError(
            f"model.peft.target_modules {cfg.target_modules}: {str(e).splitlines()[0]}; this model's "
            f"projections are named {', '.join(names)}"
        ) from None


def is_prefix_tuned(model) -> bool:
    conf = getattr(model, "peft_config", {}).get("default")
    return conf is not None and conf.peft_type.value == "PREFIX_TUNING"


def fingerprint(named_frozen) -> str:
    """sha256 over the frozen (base) parameters: name, shape, dtype and bytes of each, in the order given
    (name order from `engine.whole_params`). Each tensor is hashed as it comes: under ZeRO-3 it is whole only
    then."""
    h = hashlib.sha256()
    for name, t in named_frozen:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def check_adapter(adapter_dir: Path, expected: dict[str, tuple]) -> None:
    """After a save: every adapter tensor is there, non-empty, of the shape trained (ZeRO-3 saves of peers
    wrote 40-byte files and shape-[0] tensors)."""
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    saved = load_file(path) if path.is_file() else {}
    if not saved:
        raise RuntimeError(f"{path}: the adapter was saved empty")
    for name, t in saved.items():
        if t.numel() == 0:
            raise RuntimeError(f"{path}: {name} was saved with shape {tuple(t.shape)} (empty)")
    shapes = sorted(tuple(t.shape) for t in saved.values())
    if shapes != sorted(expected.values()):
        raise RuntimeError(
            f"{path}: saved tensor shapes {shapes} differ from the trained adapter's "
            f"{sorted(expected.values())}"
        )


def export(base_loader, conf, adapter: dict[str, torch.Tensor]):
    """Rank 0, after training: a fresh fp32 base on CPU (`base_loader()`) with the trained adapter (`conf`:
    the run's peft config) loaded into it. Returns (the model `save_hf` writes, a function writing the checked
    adapter into a directory): the merged model for LoRA; for prefix tuning, which cannot merge, the base
    (loaders apply the adapter)."""
    import warnings

    from peft import get_peft_model

    base = base_loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, conf)
    own = dict(model.named_parameters())
    unplaced = [k for k in adapter if k not in own]
    if unplaced:
        raise RuntimeError(f"trained adapter tensors {unplaced[:3]} have no place in a fresh adapter")
    with torch.no_grad():
        for k, v in adapter.items():
            own[k].copy_(v)
    # the adapter as PeftModel.save_pretrained writes it, taken before the merge (which removes it) so the
    # base is never copied; the new tokens' rows travel as trainable-token deltas, not as a copy of the
    # embedding matrix
    state = {k: v.detach().clone().contiguous() for k, v in _peft_state(model).items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    def save_adapter(directory: Path, tok) -> None:
        from safetensors.torch import save_file

        where = directory / ADAPTER_DIR
        where.mkdir(parents=True, exist_ok=True)
        # adapter_config.json the same bytes whatever PYTHONHASHSEED
        _canonical(conf).save_pretrained(where)
        save_file(state, where / "adapter_model.safetensors", metadata={"format": "pt"})
        tok.save_pretrained(where)  # `dist-ft chat --model BASE --adapter DIR` needs the run's tokens
        check_adapter(where, shapes)

    if conf.peft_type.value == "PREFIX_TUNING":
        return model.get_base_model(), save_adapter
    return model.merge_and_unload(), save_adapter


def _canonical(conf):
    """A copy of a peft config whose set-valued fields (target_modules once peft resolved "all-linear",
    modules_to_save, exclude_modules, ...) are sorted lists: peft writes a set as list(set), in an order that
    follows the string hash (PYTHONHASHSEED), so the same run's adapter_config.json would differ byte for
    byte. peft reads a list back as the same set, so nothing else changes; the keys are sorted by peft's own
    writer."""
    import copy

    conf = copy.copy(conf)
    for k, v in vars(conf).items():
        if isinstance(v, (set, frozenset)):
            setattr(conf, k, sorted(v, key=str))
    return conf


def needs_applying(adapter_dir: Path) -> bool:
    """An exported adapter that is not merged into the model beside it (prefix tuning)."""
    import json

    conf = adapter_dir / "adapter_config.json"
    return conf.is_file() and json.loads(conf.read_text()).get("peft_type") == "PREFIX_TUNING"


def apply(model, adapter_dir: str | Path):
    """An exported base (or any model) with a saved adapter applied, for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def _peft_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)
