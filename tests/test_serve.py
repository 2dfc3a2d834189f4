"""dist-ft serve against the official `openai` client, on 127.0.0.1: greedy replies equal `dist-ft chat`, streams
concatenate to the reply, usage counts are the tokenizer's, 8 concurrent clients are answered correctly, bad
requests get OpenAI-style 4xx, the API key is enforced, a full queue answers 503 and a client that disconnects
stops its generation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, run_cli
import tiny

openai = pytest.importorskip("openai")
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, gpt2_dir, toy_data) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny.run_config(tmp, gpt2_dir, 64, "max_steps: 150, micro_batch_size: 4, lr: 5.0e-3, warmup_steps: 2", "precision: fp32",
                          "track: {wandb: disabled}\n")
    r = run_cli("train", str(cfg), f"output.dir={tmp / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out" / "final"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(model: Path, *args: str, env: dict | None = None):
    port = _port()
    p = subprocess.Popen([sys.executable, "-m", "dist_ft", "serve", "--model", str(model), "--port", str(port), "--name", "toy", *args],
                         cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert p.poll() is None, p.stdout.read()
                time.sleep(0.1)
        yield base
    finally:
        p.terminate()
        p.wait(30)


@pytest.fixture(scope="module")
def server(chat_model):
    with _server(chat_model, "--api-key", KEY) as base:
        yield base


def _client(base: str, key: str | None = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key or "none", max_retries=0, timeout=120)


def _ask(client, q: str, **kw):
    return client.chat.completions.create(model="toy", messages=[{"role": "user", "content": q}], temperature=0, **kw)


def test_greedy_reply_equals_chat_cli_and_the_stream_and_counts_tokens(server, chat_model):
    from transformers import AutoTokenizer

    client = _client(server)
    res = _ask(client, "What color is the cat?", max_tokens=12)
    text, choice = res.choices[0].message.content, res.choices[0]
    cli = run_cli("chat", "--model", str(chat_model), "--prompt", "What color is the cat?", "--temperature", "0", "--max-new-tokens", "12")
    assert cli.returncode == 0 and cli.stdout.strip().splitlines()[-1] == text == "The cat is black.", (cli.stdout, text)
    parts, finish = [], None
    for chunk in client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "What color is the cat?"}],
                                                temperature=0, max_tokens=12, stream=True):
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == text and finish == choice.finish_reason == "stop" and len(parts) > 3
    tok = AutoTokenizer.from_pretrained(chat_model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What color is the cat?"}], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert res.usage.prompt_tokens == len(prompt)
    assert res.usage.completion_tokens == len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + the end-of-turn token
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    short = _ask(client, "What color is the cat?", max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    done = client.completions.create(model="toy", prompt="the apple is", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and 0 < done.usage.completion_tokens <= 4
    assert [m.id for m in client.models.list().data] == ["toy"]


def test_eight_concurrent_clients_get_their_own_answers(server):
    client = _client(server)
    things = list(tiny.COLORS)
    want = {t: _ask(client, f"What color is the {t}?", max_tokens=10).choices[0].message.content for t in things}
    got: dict = {}

    def one(t: str) -> None:
        got[t] = _ask(_client(server), f"What color is the {t}?", max_tokens=10).choices[0].message.content

    threads = [threading.Thread(target=one, args=(t,)) for t in things]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert got == want and sum(f"is {c}" in got[t] for t, c in tiny.COLORS.items()) >= 6, got


def test_bad_requests_get_openai_errors_and_the_key_is_enforced(server):
    import httpx

    with pytest.raises(openai.AuthenticationError):
        _ask(_client(server, "sk-wrong"), "hi")
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(server, None), "hi")
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "hi", max_tokens=10**6)
    assert e.value.body["code"] == "context_length_exceeded" and "max_tokens 1000000 is too large" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "apple banana cherry " * 300)
    assert e.value.body["code"] == "context_length_exceeded" and "maximum context length is 512" in e.value.body["message"]
    auth = {"Authorization": f"Bearer {KEY}"}
    for bad in ({"model": "toy"}, {"model": "toy", "messages": []}, {"model": "toy", "messages": [{"role": "robot", "content": "x"}]},
                {"model": "toy", "messages": [{"role": "user", "content": "x"}], "n": 2}):
        r = httpx.post(f"{server}/v1/chat/completions", json=bad, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={**auth, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"  # (no key needed for health checks)


def test_full_queue_answers_503_and_a_disconnect_stops_generation(chat_model):
    import httpx

    with _server(chat_model, "--max-queue", "1", env={"DIST_FT_TEST_SLOW_TOKENS": "0.5"}) as base:
        body = {"model": "toy", "messages": [{"role": "user", "content": "What color is the cat?"}], "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # (kept: a dropped line iterator closes the response, i.e. disconnects)
            first = next(lines)
            assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            busy = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
        # the client left after its first chunk: the generation stops at the next token and frees the queue
        for _ in range(100):
            health = httpx.get(f"{base}/health", timeout=5).json()
            if health["cancelled"] == 1 and health["running_or_queued"] == 0:
                break
            time.sleep(0.1)
        assert health["cancelled"] == 1 and health["running_or_queued"] == 0 and health["rejected_busy"] == 1, health
        ok = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_lm_eval_loglikelihoods_equal_our_scorer_and_results_are_saved(gpt2_dir, tmp_path):
    """lm-evaluation-harness (its HF backend, offline) on the shipped multiple-choice task: every per-choice
    log-likelihood equals dist_ft's own scorer within 1e-4; `dist-ft eval --harness` saves the results beside the run."""
    pytest.importorskip("lm_eval")
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_ft import harness

    model_dir = tmp_path / "run" / "final"
    shutil.copytree(gpt2_dir, model_dir)
    saved = harness.run(str(model_dir), ["veloria_mc"])
    samples = saved["samples"]["veloria_mc"]
    assert len(samples) == 16 and 0.0 <= saved["results"]["veloria_mc"]["acc,none"] <= 1.0
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    worst = 0.0
    for s in samples:
        for choice, ll in zip(s["doc"]["choices"], s["loglikelihoods"]):
            worst = max(worst, abs(harness.loglikelihood(tok, model, f"Question: {s['doc']['question']}\nAnswer:", f" {choice}") - ll))
    assert worst < 1e-4, worst
    acc = sum(max(range(4), key=lambda i: s["loglikelihoods"][i]) == s["target"] for s in samples) / 16
    assert saved["results"]["veloria_mc"]["acc,none"] == pytest.approx(acc)
    r = run_cli("eval", "--model", str(model_dir), "--harness", "lm-eval", "--tasks", "veloria_mc", "--limit", "4")
    assert r.returncode == 0 and "veloria_mc: acc" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval" / "lm-eval-veloria_mc.json").read_text())["tasks"] == ["veloria_mc"]
    bad = run_cli("eval", "--model", str(model_dir), "--harness", "lm-eval", "--tasks", "no_such_task")
    assert bad.returncode == 2 and "--tasks: no lm-eval task 'no_such_task'" in bad.stderr
