"""Why a run stops early: a preemption signal (save, exit 75, requeue) or a diverged loss (exit 3, no
save)."""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence

from .contracts import StepMetrics
from .errors import Preempted, UserError


class Signals:
    """Installed before anything else, so a signal during model load or data prepare still ends in exit 75.
    During setup a signal raises `Preempted` at once (there is nothing to save yet); from the first step on it
    only sets a flag, and the ranks agree on it at the next step boundary, save, and exit 75."""

    def __init__(self, names: Sequence[str]):
        self.received: list[int] = []
        self.in_setup = True
        for name in names:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        if self.in_setup:
            self.in_setup = False  # raised once; unwinding setup must not be interrupted again
            raise Preempted(f"{signal.Signals(signum).name} during setup")


class Diverged(UserError):
    """A non-finite loss or gradient norm outlasted `train.nonfinite_patience`."""

    exit_code = 3


class DivergenceGuard:
    """Counts consecutive steps whose loss or grad norm is not finite (fp16 loss-scale skips included) and
    stops the run past `patience`. While the count is non-zero the state may hold NaNs: no checkpoint then."""

    def __init__(self, patience: int | None, precision: str):
        self.patience = patience if patience is not None else (25 if precision == "fp16" else 0)
        self.streak, self._skipped = 0, 0

    def check(self, step: int, m: StepMetrics) -> None:
        skipped = (m.skipped_steps or 0) > self._skipped
        self._skipped = m.skipped_steps or 0
        bad = (
            skipped
            or not math.isfinite(m.loss)
            or (m.grad_norm is not None and not math.isfinite(m.grad_norm))
        )
        self.streak = self.streak + 1 if bad else 0
        if self.streak > self.patience:
            raise Diverged(
                f"step {step}: loss {m.loss:.6g}, "
                f"grad norm {m.grad_norm if m.grad_norm is None else f'{m.grad_norm:.6g}'}: "
                f"not finite for {self.streak} consecutive step(s) "
                f"(train.nonfinite_patience={self.patience}); this state was not saved and the last good "
                "checkpoint is kept: lower train.lr, add train.warmup_steps or set train.max_grad_norm, "
                "then rerun the same command to resume from that checkpoint"
            )

    @property
    def healthy(self) -> bool:
        """The last step was finite: its state may be checkpointed."""
        return self.streak == 0
