"""Settings of `tasks/grpo.py` (the config's `grpo:` section): rollouts, rewards and the loss."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..config_section import FREE, MUST_MATCH, Section, on_resume


class RewardSpec(Section):
    kind: Literal["exact", "numeric", "regex", "length", "function", "model"] = Field(
        description="`exact`: 1 when the completion's final answer equals the record's `answer` (after "
        "`answer_pattern`), else 0; `numeric`: the same for numbers (within 1e-6 relative); `regex`: 1 when "
        "`pattern` matches the completion (a format reward); `length`: -(completion tokens / "
        "max_completion_tokens); `function`: `function` (`package.module:name`) is imported and called as "
        "fn(prompts, completions, **record fields) -> one number per completion; `model`: a reward model "
        "(`path`: a data.task reward export) scores prompt + completion.",
    )
    weight: float = Field(1.0, description="This reward's weight in the total (a weighted sum).")
    name: str | None = Field(None, description="Name in the metrics (default: the kind, or the function).")
    pattern: str | None = Field(
        None, description="`regex`: the pattern a completion must contain (re.search)."
    )
    answer_pattern: str | None = Field(
        None,
        description="`exact` / `numeric`: a regex whose first group is the completion's answer; None: the "
        "last number (`numeric`) or the whole completion, stripped (`exact`).",
    )
    function: str | None = Field(None, description="`function`: `package.module:name`, importable.")
    path: str | None = Field(None, description="`model`: the reward model's directory.")

    @model_validator(mode="after")
    def _needs(self) -> RewardSpec:
        need = {"regex": "pattern", "function": "function", "model": "path"}.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"grpo.rewards: a `{self.kind}` reward needs `{need}`")
        if self.kind == "function" and ":" not in (self.function or ""):
            raise ValueError(
                f"grpo.rewards: function '{self.function}' is not `package.module:name`; name the module and "
                "the function, e.g. my_rewards:correct"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or (self.function.rsplit(":", 1)[-1] if self.function else self.kind)


class GrpoConfig(Section):
    # what is sampled, scored and optimized: a resume continues the same (samples_every aside)
    resume_default: ClassVar[str] = MUST_MATCH

    group_size: int = Field(
        8, ge=2, description="Completions sampled per prompt (G); advantages compare a group's rewards."
    )
    max_completion_tokens: int = Field(128, ge=1, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1: off).")
    loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="`grpo`: each completion's token mean, averaged over completions; `dr_grpo`: token sums "
        "/ max_completion_tokens, rewards not scaled by their std (Dr. GRPO); `dapo`: token sums / all "
        "completion tokens of the global batch, clip-higher (DAPO).",
    )
    scale_rewards: bool | None = Field(
        None, description="Divide advantages by the group's reward std; None: yes, except for dr_grpo."
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="Clipping: the ratio is kept in [1 - epsilon, 1 + epsilon_high]."
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip (clip-higher); None: epsilon (dapo: 0.28)."
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="KL penalty toward the reference (k3 estimator per token); 0: none. With model.peft the "
        "reference is the model with its adapters off, else the starting model in a frozen engine.",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        le=16,
        description="Optimizer steps over each batch of rollouts (μ): a training step samples once and "
        "takes this many optimizer steps; the schedule counts optimizer steps (max_steps x μ).",
    )
    share_prompts: bool = Field(
        True,
        description="Compute each group's prompt once, in sampling and in training (its keys/values serve "
        "the G completions: the numbers of a full row per completion, up to rounding); False: a full row per "
        "completion. Prefix tuning uses full rows; so does training under model.gradient_checkpointing (it "
        "drops the cache).",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="The rewards, summed with their weights (at least one)."
    )
    samples_every: int = Field(
        10,
        ge=0,
        description="Every this many steps, write a table of rollouts to samples.jsonl (0: never).",
        json_schema_extra=on_resume(FREE),
    )

    @property
    def scaled(self) -> bool:
        return self.loss != "dr_grpo" if self.scale_rewards is None else self.scale_rewards

    @property
    def clip_high(self) -> float:
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 0.28 if self.loss == "dapo" else self.epsilon
