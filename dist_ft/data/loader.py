"""Each optimizer step's micro-batches, read and collated ahead on a background thread.

While the device runs step k, a thread reads step k+1's rows from the shards, collates them and (on GPUs)
pins them, so the copy to the device can be `non_blocking` and the step never waits for the host. The
thread only computes what the main thread would have computed, in the same order: results are identical.
Each step carries the stream position after it, which is what a checkpoint saved after that step stores
(the thread itself is already further on).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from ..contracts import Batch
from .dataset import Prepared
from .stream import SampleStream


@dataclass
class Step:
    batches: list[Batch]  # grad_accum micro-batches for this rank
    data_state: dict  # the stream's state after this step (resume point)
    epoch_progress: float  # epochs done after this step
    source_tokens: dict[str, int]  # a mixture's tokens per source in this rank's batches ({}: one source)


class StepLoader:
    def __init__(
        self, prep: Prepared, stream: SampleStream, grad_accum: int, pin: bool = False, depth: int = 2
    ):
        self.prep, self.stream, self.accum, self.pin = prep, stream, grad_accum, pin
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _make(self) -> Step:
        batches, sources = [], dict[str, int]()
        for _ in range(self.accum):
            ids = self.stream.next_indices()
            rows = [self.prep.train.items[i] for i in ids]
            for name, n in self.prep.tokens_by_source(ids, rows).items():
                sources[name] = sources.get(name, 0) + n
            b = self.prep.collate(rows)
            if self.pin:
                b = b.pin_memory()
            batches.append(b)
        return Step(batches, self.stream.state_dict(), self.stream.epoch_progress, sources)

    def _work(self) -> None:
        while not self._stop.is_set():
            item: Step | BaseException
            try:
                item = self._make()
            except BaseException as e:  # handed to the main thread, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> Step:
        if self._thread is None:  # started on first use: a resumed stream is positioned by then
            self._thread = threading.Thread(target=self._work, name="dist_ft-batches", daemon=True)
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
