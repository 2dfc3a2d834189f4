"""Waits through the rendezvous TCP store, with a liveness check: no rank waits forever for a dead one.

Work of any length that some ranks do alone (tokenizing, checkpoint fsync, export, W&B start) is awaited here,
never in a collective, so no collective timeout applies to honest work. A rank that is *dead* (SIGKILL, OOM
killer, a lost node) would be awaited forever, and under `deepspeed` (pdsh) or a static `torchrun` nothing
ends the survivors; so every rank beats a heartbeat (`hb/<rank>`, a counter in the store, from a thread), and
a waiter that sees a missing rank's counter unchanged for longer than the bound
(`engine.collective_timeout_minutes`, the time a collective would wait for it too) stops with an error naming
that rank. Staleness is measured on the waiter's own monotonic clock (no clock agreement across nodes needed),
and a waiter that was itself stopped (SIGSTOP, `scontrol suspend`) starts measuring afresh. Rank 0 hosts the
store: if it dies, the store goes away and every store call raises.
"""

from __future__ import annotations

import itertools
import threading
import time

from .errors import PREEMPTED_MARK, Preempted, UserError

_WAIT = "dist_ft/wait"
_FAILED = "dist_ft/failed"
_HB = "dist_ft/hb"
_waits = itertools.count()
_beat: dict = {}  # the running heartbeat: "stop" (threading.Event), "thread", "bound" (s), "interval" (s)


def _store():
    """The rendezvous TCP store of a multi-rank process group; None for a single process."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() < 2:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def start_heartbeat(bound_s: float) -> None:
    """Beat `hb/<rank>` now and every few seconds from a daemon thread, and let waits declare a rank dead
    after `bound_s` without a beat. Called once the process group is up; a no-op for a single process."""
    import torch.distributed as tdist

    store = _store()
    if store is None or _beat:
        return
    key, interval = f"{_HB}/{tdist.get_rank()}", min(5.0, bound_s / 5)
    store.add(key, 1)  # the first beat before any wait, so no rank is ever seen without one
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store went away (rank 0 ended): the waits report that
                return

    thread = threading.Thread(target=beat, name="dist_ft-heartbeat", daemon=True)
    thread.start()
    _beat.update(stop=stop, thread=thread, bound=bound_s, interval=interval)


def stop_heartbeat() -> None:
    """Before the process group goes: the thread must not use a store that is being torn down."""
    if _beat:
        _beat["stop"].set()
        _beat["thread"].join(timeout=10)
        _beat.clear()


class _Liveness:
    """The waiter's view of the ranks it waits for: when it last saw each one's heartbeat counter change."""

    def __init__(self, world: int, bound: float, interval: float):
        self.keys = [f"{_HB}/{r}" for r in range(world)]
        self.bound, self.interval = bound, interval
        self.last = time.monotonic()
        self.seen: dict[int, tuple[bytes | None, float]] = {}

    def _beats(self, store) -> list[bytes | None]:
        if store.check(self.keys):
            try:
                return list(store.multi_get(self.keys))  # one request for every rank
            except (AttributeError, RuntimeError):
                pass
        return [store.get(k) if store.check([k]) else None for k in self.keys]

    def dead(self, store, arrival_keys: list[str]) -> list[tuple[int, float]]:
        """(rank, seconds without a beat) of ranks that have not arrived and whose heartbeat is older than the
        bound."""
        now = time.monotonic()
        # (the first look after one interval of waiting: most waits are short)
        if now - self.last < self.interval:
            return []
        # this waiter did not run for a while (stopped, suspended): afresh
        if now - self.last > max(3 * self.interval, 5.0):
            self.seen.clear()
        self.last = now
        stale = []
        for r, value in enumerate(self._beats(store)):
            old = self.seen.get(r)
            if old is None or old[0] != value:
                self.seen[r] = (value, now)
            elif now - old[1] > self.bound:
                stale.append((r, now - old[1]))
        return [(r, age) for r, age in stale if not store.check([arrival_keys[r]])]


def _dead_rank_error(dead: list[tuple[int, float]], what: str, bound: float) -> UserError:
    ranks = ", ".join(str(r) for r, _ in dead)
    age = max(a for _, a in dead)
    return UserError(
        f"rank {ranks} stopped sending heartbeats {age:.0f} s ago (the bound is "
        f"engine.collective_timeout_minutes = {bound / 60:g}) while the other ranks waited for it ({what}): "
        f"its process died or its node went down (see rank {ranks}'s log: killed, out of memory?). The "
        "launcher does not end the other ranks: stop the whole job, then run the same command to resume from "
        "the last complete checkpoint"
    )


def _wait(what: str, data: str | None, poll_s: float) -> list[str] | None:
    import torch.distributed as tdist

    store = _store()
    if store is None:
        return None if data is None else [data]
    rank, world = tdist.get_rank(), tdist.get_world_size()
    prefix = f"{_WAIT}/{next(_waits)}"
    if data is not None:
        store.set(f"{prefix}/data/{rank}", data)  # before the arrival: whoever sees it arrived finds its data
    store.set(f"{prefix}/{rank}", what)
    keys = [f"{prefix}/{r}" for r in range(world)]
    live = _Liveness(world, _beat["bound"], _beat["interval"]) if _beat else None
    delay = poll_s
    while not store.check(keys):
        if store.check([_FAILED]):
            reason = store.get(_FAILED).decode()
            if PREEMPTED_MARK in reason:
                raise Preempted(reason)
            raise UserError(f"stopped while waiting for the other ranks ({what}): {reason}")
        if live is not None and (dead := live.dead(store, keys)):
            raise _dead_rank_error(dead, what, live.bound)
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)
    if data is None or rank != 0:
        return None
    got = [store.get(f"{prefix}/data/{r}").decode() for r in range(world)]
    for r in range(world):
        store.delete_key(f"{prefix}/data/{r}")
    return got


def wait_for_all(what: str, poll_s: float = 0.05) -> None:
    """Barrier for work of any length that some ranks do alone (rank 0 exporting, fsyncing a checkpoint,
    converting one, one rank per node tokenizing): each rank marks its arrival in the rendezvous TCP store
    and polls until all have, so no collective (and its timeout) is pending meanwhile. Every rank must call
    it in the same order. Raises if a rank reported a failure (`report_failure`), a rank that has not arrived
    is dead (no heartbeat within the bound), or the store went away (rank 0 died)."""
    _wait(what, None, poll_s)


def gather_on_main(what: str, data: str, poll_s: float = 0.05) -> list[str] | None:
    """`wait_for_all` that also carries one string per rank: rank 0 gets every rank's `data` (in rank order),
    the others None; a single process gets `[data]`. Through the store, so it waits as patiently as
    `wait_for_all`."""
    return _wait(what, data, poll_s)


def report_failure(message: str) -> None:
    """Tell ranks waiting in `wait_for_all` that this rank failed, so they stop instead of waiting forever."""
    import torch.distributed as tdist

    store = _store()
    if store is None:
        return
    try:
        store.set(_FAILED, f"rank {tdist.get_rank()} failed: {message}"[:2000])
    except Exception:  # noqa: BLE001 - the store may be gone already; the launcher ends the job then
        pass
