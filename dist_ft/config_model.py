"""The config's `model:` section: what to fine-tune (`ModelConfig`) and its adapters (`PeftConfig`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from .config_section import FREE, MUST_MATCH, Section, no_credentials, on_resume


class PeftConfig(Section):
    method: Literal["lora", "prefix"] = Field(
        "lora",
        description="`lora`: low-rank adapters on the projections; `prefix`: trained virtual key/value "
        "prefixes (prefix tuning).",
    )
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) * B A.")
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA input (0 for exact merged == adapter logits)."
    )
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description="`auto`: every linear / Conv1D projection in the blocks (not the output head); or module "
        "names, e.g. [q_proj, v_proj].",
    )
    num_virtual_tokens: int = Field(16, ge=1, description="Prefix tuning: virtual tokens per layer.")
    train_new_tokens: bool = Field(
        True,
        description="Also train the embedding rows of tokens the tokenizer gained (ChatML markers on a base "
        "model); frozen random rows otherwise.",
    )


class ModelConfig(Section):
    resume_default: ClassVar[str] = MUST_MATCH
    path: str = Field(
        "gpt2",
        description="Hub id, local directory, or `pkg://<python package>` (a directory shipped inside an "
        "installed package).",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `path` to load (dequantized to a regular model)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Allow model/tokenizer code from the hub to run. Off unless you trust the repo."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers pick (sdpa where supported)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (slower)."
    )
    activation_offload: bool = Field(
        False,
        description="Keep what backward needs of the forward (with gradient_checkpointing: each layer's "
        "input) in pinned host memory and copy it back for backward (ALST's checkpoint offload); GPU only, "
        "values unchanged. Needs gradient_checkpointing.",
        json_schema_extra=on_resume(FREE),
    )
    tiled_mlp: int = Field(
        0,
        ge=0,
        description="Run each decoder layer's MLP over this many tiles of the sequence, recomputing each "
        "tile in backward (DeepSpeed's TiledMLP, from ALST), so its wide intermediate activations exist for "
        "one tile at a time; 0: off. For long sequences.",
    )
    chat_template: Literal["auto", "chatml"] = Field(
        "auto",
        description="`auto`: keep the tokenizer's template, add ChatML if it has none; `chatml`: always use "
        "our ChatML template.",
    )
    peft: PeftConfig | None = Field(
        None,
        description="Parameter-efficient fine-tuning (LoRA or prefix tuning, with `peft`); None: every "
        "weight trains.",
    )
    _no_url_credentials = field_validator("path")(no_credentials)

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> ModelConfig:
        if self.activation_offload and not self.gradient_checkpointing:
            raise ValueError(
                "model.activation_offload needs model.gradient_checkpointing: true (without it every "
                "activation would cross to host memory and back); set model.gradient_checkpointing=true"
            )
        return self
