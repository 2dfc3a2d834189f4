"""Metrics: console lines, a JSONL file (one object per step/eval), a loss-curve PNG and, optionally,
Weights & Biases - all from rank 0. With `output.log_all_ranks`, every other rank writes its own
`rank-R.log` and `metrics-rank-R.jsonl`."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from . import fsio
from .config import TrackConfig
from .contracts import StepMetrics
from .redact import scrub

WandbMode = Literal["online", "offline"]


def wandb_mode(track: TrackConfig, environ=os.environ) -> WandbMode | None:
    """online / offline, or None for no W&B. `auto` never needs a network: offline unless a key is set."""
    if track.wandb == "disabled":
        return None
    if track.wandb != "auto":
        return track.wandb
    env_mode = environ.get("WANDB_MODE", "").lower()
    if env_mode in ("disabled", "off"):
        return None
    if env_mode == "online" or env_mode == "offline":  # (narrowed to the literal for the type checker)
        return env_mode
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    def __init__(
        self,
        out_dir: Path,
        rank: int,
        *,
        total_steps: int,
        log_every: int,
        start_step: int = 0,
        all_ranks: bool = False,
        track: TrackConfig | None = None,
        run_id: str | None = None,
        config: dict | None = None,
    ):
        """`run_id`: the W&B run to continue (from a checkpoint); `config`: the resolved config W&B shows."""
        self.enabled, self.log_every = rank == 0, log_every
        self.path = out_dir / "metrics.jsonl"
        self._f = self._side = self.wandb = None
        self.run_id = run_id
        if self.enabled:
            self._f = self.path.open("a", encoding="utf-8")
            mode = wandb_mode(track) if track is not None else None
            if mode and track is not None:
                self.wandb = _wandb_init(track, mode, out_dir, run_id, config or {})
                self.run_id = self.wandb.id
        elif all_ranks:  # debugging: this rank's own view (memory, step times, messages)
            self._f = (out_dir / f"metrics-rank-{rank}.jsonl").open("a", encoding="utf-8")
            self._side = (out_dir / f"rank-{rank}.log").open("a", encoding="utf-8")
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.enabled or not sys.stderr.isatty(),
        )  # no bar in log files

    def info(self, msg: str) -> None:
        # the console and rank-R.log never show a secret (the config in W&B is dump_config's, scrubbed too)
        msg = scrub(msg)
        if self.enabled:
            tqdm.write(msg)
        elif self._side:
            self._side.write(msg + "\n")
            self._side.flush()

    def log_step(self, step: int, m: StepMetrics) -> None:
        if m.model_states is not None:
            from .perf import format_table

            s = m.model_states
            trains = (
                f" ({s.n_trainable:,} trainable, {100 * s.n_trainable / s.n_params:.2f}%)"
                if s.n_trainable is not None
                else ""
            )
            self.info(
                f"{s.n_params / 1e6:.2f}M params{trains} | model states per rank: "
                f"{format_table(s.formula, s.measured)}"
            )
        self.log(step, m.record())

    def log(self, step: int, metrics: dict) -> None:
        if self._f is None:
            return
        rec = {"step": step, **metrics}  # full float precision: resume tests compare losses bitwise
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if not self.enabled:
            return
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        if "loss" in metrics:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
            if step % self.log_every == 0:
                gn = metrics.get("grad_norm")
                tqdm.write(
                    f"step {step:>6} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.3e} | grad_norm "
                    f"{'n/a' if gn is None else f'{gn:.3f}'} | tok/s {metrics['tokens_per_s']:.0f} | "
                    f"loss-tok/s {metrics['loss_tokens_per_s']:.0f}"
                )
        elif any(k.startswith("val_") for k in metrics):
            tqdm.write(
                f"eval @ step {step} | "
                + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            )

    def samples(self, step: int, rows: list[dict]) -> None:
        """Sample generations (rows of the same keys, e.g. prompt, answer): samples.jsonl and a W&B table."""
        if not self.enabled or not rows:
            return
        with (self.path.parent / "samples.jsonl").open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            import wandb

            columns = ["step", *rows[0]]
            data = [[step, *(row[k] for k in rows[0])] for row in rows]
            self.wandb.log({"samples": wandb.Table(columns=columns, data=data)}, step=step)

    def close(self, exit_code: int = 0) -> None:
        for f in (self._f, self._side):
            if f is not None:
                f.close()
        if not self.enabled:
            return
        self.bar.close()
        plot_losses(self.path, self.path.parent / "loss.png")
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)


def wandb_unreachable(environ=os.environ, timeout_s: float = 3.0) -> str | None:
    """Why the W&B server cannot be reached (None when it can): one TCP connect to its host, DNS included,
    bounded to `timeout_s` however the network fails (a thread does it: name lookups ignore socket
    timeouts)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    result: list = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e.strerror or e}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s)
    if result and result[0] is None:
        return None
    return f"{host}:{port}: {result[0] if result else f'no answer within {timeout_s:g} s'}"


def _wandb_init(track: TrackConfig, mode: WandbMode, out_dir: Path, run_id: str | None, config: dict):
    import wandb

    if mode == "online":
        why = wandb_unreachable()
        if why is not None:  # never hang on a network that is not there: the run logs offline, to sync later
            mode = "offline"
            print(
                f"warning: W&B server unreachable ({why}); logging offline to {out_dir / 'wandb'} instead, "
                "upload it later with `wandb sync`",
                file=sys.stderr,
                flush=True,
            )
    run = wandb.init(
        project=track.project,
        entity=track.entity,
        name=track.run_name or out_dir.resolve().name,
        tags=track.tags,
        id=run_id,
        resume="allow",  # a resumed or requeued job continues the run its checkpoint names
        dir=str(out_dir),
        mode=mode,
        config=config,
        settings=wandb.Settings(console="off", silent=True, save_code=False, disable_git=True),
    )
    return run


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records up to `last_step` (0: none), atomically."""
    keep = [r for r in read_metrics(path) if r["step"] <= last_step] if path.is_file() else []
    fsio.write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A crash can leave its last line torn or NUL-filled (the filesystem grew
    the file before the data reached it): such lines are skipped, so they never block a resume."""
    recs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip().strip("\x00")
        try:
            rec = json.loads(line) if line else None
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            recs.append(rec)
    return recs


def read_steps(path: Path) -> list[StepMetrics]:
    """The training steps recorded in a metrics.jsonl, in order (evaluations and checkpoint timings left
    out)."""
    return [StepMetrics.from_record(r) for r in read_metrics(path) if "loss" in r]


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    fsio.replace_file(tmp, png_path)
