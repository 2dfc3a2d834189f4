"""GRPO (data.task grpo): the loss and its gradients against an fp64 loop written out by hand for each variant,
a group of equal rewards gives no gradient, rewards' bad returns and bad configs fail in one line, and on CPU
ranks: the sampling is the same on 1 and 2 ranks and ZeRO-0/3, a SIGKILL + resume is bit-identical, LoRA
trains and exports, and a tiny GPT-2 raises a reward well above its start."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiny
import torch
from helpers import (
    REPO,
    assert_clean_failure,
    assert_identical_runs,
    free_port,
    metric_records,
    run_cli,
    run_cmd,
    train_cmd,
)
from safetensors.torch import load_file

from dist_ft.config import ModelConfig
from dist_ft.errors import UserError
from dist_ft.model import load_model
from dist_ft.task_settings.grpo import GrpoConfig, RewardSpec
from dist_ft.tasks import grpo
from dist_ft.tokenizer import load_tokenizer

# ---------------------------------------------------------------- the loss against an fp64 loop

PROMPTS = [[5, 17, 9], [30, 4]]
COMPS = [[11, 12, 13], [14], [15, 16], [21, 22], [23, 24, 25, 26], [27]]  # 2 groups of 3
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, -1.0]
G = 3


@pytest.fixture(scope="module")
def policy(gpt2_dir):
    cfg = ModelConfig(path=str(gpt2_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, torch.float32)
    model.eval()  # (the tiny GPT-2 has no dropout; eval keeps it certain)
    return model, tok


def _batch(pad_id: int, scaled: bool, rewards=REWARDS, old_shift: float = 0.0, model=None, shared=False):
    prompts = [p for p in PROMPTS for _ in range(G)]
    b = grpo.training_batch(prompts, COMPS, {"r": (1.0, list(rewards))}, G, scaled, pad_id, shared)
    if old_shift:  # old log-probs off the current ones (as after an optimizer pass): some ratios clip
        with torch.no_grad():
            logp, _ = grpo.target_logps(model, b)
        signs = torch.tensor([(-1.0) ** i for i in range(len(logp))])
        b.extra["old_logps"] = logp - old_shift * signs
    return b


def _oracle(model, s: GrpoConfig, rewards, old_shift: float) -> tuple[float, dict]:
    """The GRPO objective of the module doc, term by term in fp64 on one sequence at a time."""
    m = _fp64(model)
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = []
    for g in range(len(r) // G):
        grp = r[g * G : (g + 1) * G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        adv += [(x - mean) / (std + 1e-4) if s.scaled else x - mean for x in grp]
    total, k, per_comp = torch.zeros((), dtype=torch.float64), 0, []
    for i, comp in enumerate(COMPS):
        prompt = PROMPTS[i // G]
        ids = torch.tensor([prompt + comp])
        logits = m(input_ids=ids).logits[0]
        terms = []
        for j, tok in enumerate(comp):
            lp = torch.log_softmax(logits[len(prompt) - 1 + j], -1)[tok]
            old = lp.detach() - (old_shift * (-1.0) ** k if old_shift else 0.0)
            k += 1
            ratio = torch.exp(lp - old)
            a = adv[i]
            clipped = min(max(ratio, 1 - s.epsilon), 1 + s.clip_high)
            terms.append(-torch.minimum(ratio * a, clipped * a))
        per_comp.append(sum(terms))
    n_tokens = sum(len(c) for c in COMPS)
    for i, t in enumerate(per_comp):
        if s.loss == "grpo":
            total = total + t / len(COMPS[i])
        elif s.loss == "dr_grpo":
            total = total + t / s.max_completion_tokens
        else:
            total = total + t * len(COMPS) / n_tokens  # (the loop divides by the completions)
    total.backward()
    return float(total.detach()), {n: p.grad for n, p in m.named_parameters()}


def _fp64(model):
    import copy

    m = copy.deepcopy(model).double()
    m.zero_grad(set_to_none=True)
    return m


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("old_shift", [0.0, 0.3])
@pytest.mark.parametrize("shared", [True, False], ids=["prompt-once", "full-rows"])
def test_loss_and_gradients_equal_an_fp64_loop(policy, variant, old_shift, shared):
    """Each prompt (3 and 2 tokens: padded) computed once for its group, or a full row per completion: the
    oracle runs each prompt + completion alone."""
    model, tok = policy
    s = GrpoConfig(loss=variant, max_completion_tokens=4, rewards=[RewardSpec(kind="length")])
    b = _batch(tok.pad_token_id, s.scaled, old_shift=old_shift, model=model, shared=shared)
    if shared:  # the prompts once: 5 tokens, not 3 x 3 + 3 x 2
        assert b.prefix_ids is not None and b.n_tokens == 5 + sum(len(c) for c in COMPS)
    b.extra["tokens_per_completion"] = sum(len(c) for c in COMPS) / len(COMPS)
    model.zero_grad(set_to_none=True)
    out = grpo.loss(model, b, 0, s=s, adapters=False)
    out.sum.backward()
    want, grads = _oracle(model, s, REWARDS, old_shift)
    got = float(out.sum.detach())
    assert abs(got - want) < 1e-5 * max(1.0, abs(want)), (got, want)
    worst = max(float((p.grad.double() - grads[n]).abs().max()) for n, p in model.named_parameters())
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 0 and worst < 1e-5 * scale, (worst, scale)
    if old_shift:  # the shifted old log-probs put some ratios outside the clip range
        assert float(out.metrics["clipped"]) > 0
    else:
        assert float(out.metrics["clipped"]) == 0
    assert float(out.metrics["reward"]) == pytest.approx(sum(REWARDS))


@pytest.mark.unit
def test_the_first_pass_keeps_its_log_probs_as_the_old_ones(policy):
    """grpo.num_iterations > 1: the first pass over a rollout is the sampling policy (ratio 1); its log-probs
    are kept, so after an optimizer step the next pass's ratios are new / old and clip (no second forward)."""
    model, tok = policy
    s = GrpoConfig(epsilon=0.01, rewards=[RewardSpec(kind="length")])
    b = _batch(tok.pad_token_id, s.scaled)
    out = grpo.loss(model, b, 0, s=s, adapters=False)
    with torch.no_grad():
        want, _ = grpo.target_logps(model, b)
    assert torch.equal(b.extra["old_logps"], want) and float(out.metrics["clipped"]) == 0
    import copy

    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = grpo.loss(moved, b, 0, s=s, adapters=False)
    assert torch.equal(b.extra["old_logps"], want) and float(again.metrics["clipped"]) > 0


@pytest.mark.unit
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_sampler_decodes_what_generate_decodes(arch, gpt2_dir, llama_dir):
    """Our decoding loop (each prompt's keys/values once for its rows, finished rows leaving the batch) at a
    temperature that leaves one token possible follows transformers' greedy `generate` token for token:
    left-padded prompts of 4 lengths; a stop token chosen so that rows end at different steps."""
    from transformers import GenerationConfig

    from dist_ft import rollout

    cfg = ModelConfig(path=str(gpt2_dir if arch == "gpt2" else llama_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, torch.float32).eval()
    prompts = [[5, 17, 9, 40], [30, 4], [7], [8, 9, 10, 11, 12, 13, 14]]
    width, pad = max(map(len, prompts)), tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=pad, eos_token_id=None)
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=att, generation_config=gen)[:, width:].tolist()
    sampler = rollout.KVSampler(tok)
    sampler.stop = {greedy[0][3]}  # row 0 ends at its 4th token; the others where (if) it comes up
    want = [g[: next((i + 1 for i, t in enumerate(g) if t in sampler.stop), 12)] for g in greedy]
    assert len({len(w) for w in want}) > 1
    s = GrpoConfig(max_completion_tokens=12, temperature=1e-6, rewards=[RewardSpec(kind="length")])
    got = sampler.sample(model, ids, att, 2, s, seed=3)
    assert got == [w for w in want for _ in range(2)]


def test_at_zero3_a_rank_whose_rows_ended_steps_on_with_the_others(gpt2_dir, tmp_path):
    """Two ZeRO-3 ranks sampling (tests/sampler_probe.py): rank 0's rows end at their first token, rank 1's
    run all 10; rank 0 keeps stepping (its parameter gathers serve rank 1 too: otherwise rank 1 hangs),
    both run 10 forwards, and each draws what one process without DeepSpeed draws."""
    import os
    import subprocess
    import sys

    import sampler_probe as probe

    cfg = ModelConfig(path=str(gpt2_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, torch.float32)
    free, _ = probe.sample(model, tok, probe.PROMPTS[0], set())
    first = {c[0] for c in free}
    want0, alone = probe.sample(model, tok, probe.PROMPTS[0], first)
    want1, _ = probe.sample(model, tok, probe.PROMPTS[1], set())
    assert alone == 1 and [len(c) for c in want0] == [1, 1] and [len(c) for c in want1] == [10, 10]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), "tests/sampler_probe.py", str(gpt2_dir), str(tmp_path)]
    cmd += [",".join(map(str, sorted(first)))]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert got[0]["completions"] == want0 and got[1]["completions"] == want1
    assert got[0]["forwards"] == got[1]["forwards"] == 10


@pytest.mark.unit
def test_a_draw_is_the_inverse_cdf_of_its_uniform():
    from dist_ft.rollout import draw

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.0, 0.4]]))
    pick = lambda u, top_p=1.0: draw(logits, 1.0, top_p, torch.tensor(u)).tolist()  # noqa: E731
    assert pick([0.05, 0.49]) == [0, 0] and pick([0.15, 0.61]) == [1, 2] and pick([0.95, 0.0]) == [2, 0]
    assert pick([1 - 1e-12, 1 - 1e-12]) == [2, 2]  # never a token of probability 0
    # nucleus 0.75: 0.7 alone falls short, so 0.7 and 0.2 (renormalized), and 0.6 and 0.4; 0.5: the first
    assert pick([0.7, 0.99], top_p=0.75) == [2, 2] and pick([0.8, 0.3], top_p=0.75) == [1, 0]
    assert pick([0.99, 0.99], top_p=0.5) == [2, 0]
    # frequencies: 20,000 draws of a 4-token distribution at temperature 2
    torch.manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    toks = draw(probs.log().expand(20000, 4), 2.0, 1.0, torch.rand(20000))
    want = torch.softmax(probs.log() / 2, 0)
    assert torch.allclose(torch.bincount(toks, minlength=4) / 20000, want, atol=0.015)


@pytest.mark.unit
def test_prefix_tuning_and_gradient_checkpointing_train_on_full_rows(gpt2_dir, policy):
    """Prefix tuning's virtual tokens travel as a KV cache of their own: GRPO leaves its prompts in full
    rows there (sampling with `generate`); gradient checkpointing drops the cache in training: full rows in
    the loss, and a shared-prefix batch under it is an error, never a silently wrong loss."""
    from dist_ft import rollout
    from dist_ft.config import Config

    base = {
        "model": {"path": str(gpt2_dir)},
        "data": {"train": "x.jsonl", "task": "grpo", "packing": False},
        "grpo": {"rewards": [{"kind": "length"}]},
    }
    cases = (
        ({"peft": None}, True, True),
        ({"peft": {"method": "lora"}}, True, True),
        ({"peft": {"method": "prefix"}}, False, False),
        ({"gradient_checkpointing": True}, True, False),  # (it drops the cache in training)
    )
    for model_keys, sample_shared, loss_shared in cases:
        cfg = Config.model_validate({**base, "model": {**base["model"], **model_keys}})
        task = grpo.configure(grpo.TASK, cfg)
        backend = task.rollout.keywords["backend"]
        assert isinstance(backend, rollout.KVSampler) is sample_shared
        assert task.rollout.keywords["shared"] is loss_shared
    model, tok = policy
    b = _batch(tok.pad_token_id, True, shared=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        with pytest.raises(RuntimeError, match="kept no KV cache"):
            grpo.target_logps(model, b)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


@pytest.mark.unit
def test_a_group_of_equal_rewards_gives_no_gradient(policy):
    model, tok = policy
    s = GrpoConfig(rewards=[RewardSpec(kind="length")])
    b = _batch(tok.pad_token_id, s.scaled, rewards=[0.5, 0.5, 0.5, 2.0, 2.0, 2.0])
    model.zero_grad(set_to_none=True)
    out = grpo.loss(model, b, 0, s=s, adapters=False)
    out.sum.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert float(out.metrics["zero_std_groups"]) == 6  # every completion sits in a zero-std group


@pytest.mark.unit
def test_advantages_by_hand():
    a, std = grpo.advantages(torch.tensor([1.0, 0.0, 0.5, 3.0, 3.0, 3.0], dtype=torch.float64), 3, True)
    assert torch.allclose(a[:3], torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64) / (0.5 + 1e-4))
    assert not a[3:].any() and std[3:].tolist() == [0.0] * 3
    a, _ = grpo.advantages(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), 3, False)
    assert a.tolist() == [0.5, -0.5, 0.0]


# ---------------------------------------------------------------- rewards


@pytest.mark.unit
def test_builtin_rewards():
    from dist_ft import rewards

    def run(spec, completions, fields, lengths=None):
        return rewards.build([spec], 8, rewards.reward_model)[0][1](
            [None] * len(completions), completions, lengths or [1] * len(completions), fields
        )

    f = [{"answer": "42"}] * 3
    assert run(RewardSpec(kind="numeric"), ["it is 41, no 42.", "42.0", "forty-two"], f) == [1.0, 1.0, 0.0]
    assert run(RewardSpec(kind="exact"), [" 42 ", "42!", "4 2"], f) == [1.0, 0.0, 0.0]
    spec = RewardSpec(kind="exact", answer_pattern=r"answer: (\S+)")
    assert run(spec, ["so answer: 42", "answer: 7", "42"], f) == [1.0, 0.0, 0.0]
    assert run(RewardSpec(kind="regex", pattern=r"^<a>.*</a>$"), ["<a>x</a>", "x"], f[:2]) == [1.0, 0.0]
    assert run(RewardSpec(kind="length"), ["a", "b"], f[:2], lengths=[2, 8]) == [-0.25, -1.0]
    with pytest.raises(UserError, match="has none; add `answer`"):
        run(RewardSpec(kind="numeric"), ["1"], [{}])


@pytest.mark.unit
def test_bad_reward_functions_fail_in_one_line(tmp_path, monkeypatch):
    from dist_ft import rewards

    (tmp_path / "my_rewards.py").write_text(
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
        "def fine(prompts, completions, answer, **kw):\n    return [float(c == a) for c, a in zip(completions, answer)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def call(name):
        spec = RewardSpec(kind="function", function=f"my_rewards:{name}")
        ((_, score),) = rewards.build([spec], 8, rewards.reward_model)
        return rewards.checked(spec, score([None] * 2, ["a", "b"], [1, 1], [{"answer": "a"}] * 2), 2)

    assert call("fine") == [1.0, 0.0]
    for name, why in (
        ("nan", "returned nan for completion 0; rewards must be finite"),
        ("short", "returned 1 values for 2 completions"),
        ("boom", "raised KeyError"),
        ("missing", "cannot be imported"),
    ):
        with pytest.raises(UserError, match=why):
            call(name)
    with pytest.raises(ValueError, match="is not `package.module:name`"):
        RewardSpec(kind="function", function="my_rewards.fine")
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        GrpoConfig(group_size=1)


# ---------------------------------------------------------------- training on CPU ranks

STEPS = 6


@pytest.fixture(scope="module")
def grpo_cfg(tmp_path_factory, gpt2_dir) -> Path:
    """Prompts with an answer; a dense reward a tiny random GPT-2 can move (a function of the tests): the
    share of a completion's characters that are vowels."""
    tmp = tmp_path_factory.mktemp("grpo")
    recs = [
        {"prompt": f"What color is the {x}?", "answer": "blue"} for x in ("sky", "sea", "lake", "ink")
    ] * 8
    train = tiny.write_jsonl(tmp / "prompts.jsonl", recs)
    path = tmp / "grpo.yaml"
    path.write_text(
        f"model: {{path: {gpt2_dir}}}\ndata: {{train: {train}, max_seq_len: 64, task: grpo, packing: false}}\n"
        f"train: {{max_steps: {STEPS}, micro_batch_size: 2, lr: 1.0e-2, warmup_steps: 0, schedule: constant}}\n"
        "engine: {precision: fp32}\ncheckpoint: {every_steps: 3}\ntrack: {wandb: disabled}\n"
        "grpo: {group_size: 4, max_completion_tokens: 8, samples_every: 3, rewards: [{kind: function, function: 'grpo_rewards:vowels'},"
        " {kind: regex, pattern: blue, weight: 0.5}]}\n"
    )
    return path


def _env() -> dict:
    import os

    here = str(Path(__file__).resolve().parent)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def one(grpo_cfg) -> Path:
    out = grpo_cfg.parent / "one"
    r = run_cmd(train_cmd(grpo_cfg, out, 1), _env())
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _steps(out: Path) -> list[dict]:
    return [x for x in metric_records(out) if "reward" in x and "loss" in x]


def test_metrics_of_every_step(one):
    steps = _steps(one)
    assert len(steps) == STEPS
    for x in steps:
        assert 0 <= x["zero_std_groups"] <= 1 and 0 < x["completion_length"] <= 8
        assert x["clipped"] == 0 and x["kl"] == 0 and x["entropy"] > 0
        assert x["reward"] == pytest.approx(x["reward_vowels"] + 0.5 * x["reward_regex"])
        assert x["loss_tokens"] == 8  # completions: 2 prompts x 4
    # a table of the rollouts every grpo.samples_every steps (default 10: set to 3 here)
    rows = [json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {3, 6} and len(rows) == 16
    assert set(rows[0]) == {"step", "prompt", "completion", "reward"}
    assert all(r["prompt"].startswith("What color is the ") for r in rows)


def test_eval_checks_greedy_answers_of_prompt_records(one, grpo_cfg):
    """`dist-ft eval` on {prompt, answer} records: every prompt answered greedily, the reply checked as the
    exact / numeric rewards check it (the tiny model never says "blue": 0% both ways, 32 questions)."""
    r = run_cli("eval", "--model", str(one / "final"), "--data", str(grpo_cfg.parent / "prompts.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "reply is exactly the answer 0.0% | last number is the answer 0.0% (of 32 held-out questions)"
        in r.stdout
    )


def test_two_ranks_and_zero3_sample_and_train_like_one_rank(one, grpo_cfg):
    """A batch's completions are drawn from its own seed (the run's, the step, its prompts): 2 ranks of one
    prompt each at ZeRO-3 (generation gathering the weights as it goes) sample and train like 1 rank at ZeRO-0
    taking the same two prompts as 2 micro-batches of one - with a KL to the starting model, which full
    fine-tuning keeps in a frozen engine of its own (partitioned at ZeRO-3, whole at ZeRO-0)."""
    ref, two = grpo_cfg.parent / "accum2", grpo_cfg.parent / "two-z3"
    small = ("train.micro_batch_size=1", "grpo.beta=0.05")
    r = run_cmd(train_cmd(grpo_cfg, ref, 1, *small, "train.grad_accum=2"), _env())
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cmd(train_cmd(grpo_cfg, two, 2, *small, "engine.zero_stage=3"), _env())
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _steps(ref), _steps(two)
    assert [x["reward"] for x in a] == pytest.approx([x["reward"] for x in b], abs=1e-9)
    assert [x["completion_length"] for x in a] == [x["completion_length"] for x in b]
    la, lb = [x["grad_norm"] for x in a], [x["grad_norm"] for x in b]
    assert max(la) > 0 and max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-5 * max(la), (la, lb)
    kl = [x["kl"] for x in b]
    assert kl[0] == 0 and max(kl) > 0 and [x["kl"] for x in a] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_sigkill_resume_is_bit_identical(one, grpo_cfg):
    out = grpo_cfg.parent / "killed"
    r = run_cmd(train_cmd(grpo_cfg, out, 1), {**_env(), "DIST_FT_TEST_KILL_AT_STEP": "5"})
    assert r.returncode != 0 and (out / "checkpoints" / "step-3").is_dir()
    r = run_cmd(train_cmd(grpo_cfg, out, 1), _env())
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert [x["reward"] for x in _steps(out)] == [x["reward"] for x in _steps(one)]
    assert_identical_runs(one, out)


def test_several_optimizer_steps_per_rollout_schedule_clip_and_resume_exactly(grpo_cfg):
    """grpo.num_iterations 2: each step samples once and takes 2 optimizer steps over the rollouts; the
    schedule counts optimizer steps (warmup 1 step = 2 optimizer steps: lr x 1/3, then x 1; the sampling seed
    follows them too); later passes' ratios clip; SIGKILL after step 3 + resume from step-2 is bit-identical."""
    mu = ("grpo.num_iterations=2", "train.max_steps=4", "train.warmup_steps=1", "checkpoint.every_steps=2")
    full, killed = grpo_cfg.parent / "mu2", grpo_cfg.parent / "mu2-killed"
    r = run_cmd(train_cmd(grpo_cfg, full, 1, *mu), _env())
    assert r.returncode == 0, r.stderr[-3000:]
    steps = _steps(full)
    assert [x["lr"] for x in steps] == pytest.approx([1e-2 / 3, 1e-2, 1e-2, 1e-2])
    assert max(x["clipped"] for x in steps) > 0
    r = run_cmd(train_cmd(grpo_cfg, killed, 1, *mu), {**_env(), "DIST_FT_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0 and (killed / "checkpoints" / "step-2").is_dir()
    # what a rollout's optimizer steps are is part of the run: another μ on resume is refused in one line
    r = run_cmd(train_cmd(grpo_cfg, killed, 1, *mu, "grpo.num_iterations=3"), _env())
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "grpo.num_iterations" in errors[0], r.stderr[-2000:]
    r = run_cmd(train_cmd(grpo_cfg, killed, 1, *mu), _env())
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert_identical_runs(full, killed)


def test_lora_grpo_with_a_kl_to_the_adapters_off_model_trains_and_exports(grpo_cfg):
    out = grpo_cfg.parent / "lora"
    lora = ("model.peft.method=lora", "model.peft.r=4", "grpo.beta=0.1", "train.max_steps=3")
    r = run_cmd(train_cmd(grpo_cfg, out, 1, *lora), _env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    steps = _steps(out)
    assert steps[0]["kl"] == 0 and any(x["kl"] > 0 for x in steps[1:])  # B = 0 at the start: policy == ref


def test_a_tiny_gpt2_raises_its_reward(grpo_cfg):
    out = grpo_cfg.parent / "learn"
    r = run_cmd(train_cmd(grpo_cfg, out, 1, "train.max_steps=30", "checkpoint.every_steps=0"), _env())
    assert r.returncode == 0, r.stderr[-3000:]
    rewards = [x["reward_vowels"] for x in _steps(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GRPO tiny GPT-2, vowel share: first 5 steps {first:.3f} -> last 5 {last:.3f}")
    assert last > first + 0.1, rewards


@pytest.mark.parametrize(
    "override, why",
    [
        ("grpo.rewards=[]", "needs at least one reward"),
        ("grpo.rewards=[{kind: function, function: 'no_such_module:f'}]", "cannot be imported"),
        ("grpo.max_completion_tokens=60", "the prompt is \\d+ tokens and grpo.max_completion_tokens 60"),
        ("grpo.group_size=1", "group_size"),
    ],
)
def test_bad_input_fails_in_one_line(grpo_cfg, override, why):
    out = grpo_cfg.parent / "bad"
    r = run_cmd(
        train_cmd(grpo_cfg, out, 1, override, f"data.cache_dir={grpo_cfg.parent / 'cache-bad'}"), _env()
    )
    assert_clean_failure(r, why, out)


def test_a_reward_returning_nan_stops_the_run_in_one_line(grpo_cfg):
    out = grpo_cfg.parent / "nan"
    bad = "grpo.rewards=[{kind: function, function: 'grpo_rewards:nan_at_step_two'}]"
    r = run_cmd(train_cmd(grpo_cfg, out, 1, bad), _env())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "returned nan for completion" in errors[0] and "nan_at_step_two" in errors[0]


@pytest.mark.unit
def test_a_reward_model_scores_prompt_and_completion_through_its_template(gpt2_dir, tmp_path):
    """A one-label sequence head saved as a `data.task: reward` run exports it (ChatML tokenizer included):
    the reward is its score of the rendered conversation, as a direct forward computes it."""
    from transformers import AutoModelForSequenceClassification

    from dist_ft import rewards

    tok = load_tokenizer(ModelConfig(path=str(gpt2_dir)))
    torch.manual_seed(0)
    head = AutoModelForSequenceClassification.from_pretrained(gpt2_dir, num_labels=1)
    head.resize_token_embeddings(len(tok))
    head.config.pad_token_id = tok.pad_token_id
    head.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    fields = [{"_messages": [{"role": "user", "content": "What color is the sky?"}]}] * 2
    got = rewards.reward_model(str(tmp_path / "rm"))(None, ["blue", "It is green, I think."], [1, 6], fields)
    for text, value in zip(["blue", "It is green, I think."], got, strict=True):
        conv = [*fields[0]["_messages"], {"role": "assistant", "content": text}]
        ids = tok(
            tok.apply_chat_template(conv, tokenize=False), return_tensors="pt", add_special_tokens=False
        )
        with torch.no_grad():
            want = head.eval()(**ids).logits[0, 0].item()
        assert abs(value - want) < 1e-5
    assert got[0] != got[1]
    two = AutoModelForSequenceClassification.from_pretrained(gpt2_dir, num_labels=2)
    two.save_pretrained(tmp_path / "classifier")
    tok.save_pretrained(tmp_path / "classifier")
    with pytest.raises(UserError, match="has 2 labels; a reward model has one"):
        rewards.reward_model(str(tmp_path / "classifier"))
    with pytest.raises(UserError, match="cannot be loaded"):
        rewards.reward_model(str(tmp_path / "missing"))
