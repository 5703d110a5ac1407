"""The thread governor: one torch thread while the process waits for CPU, the full count
again when the waiting stops; nothing on a quiet machine or when turned off."""

from __future__ import annotations

import pytest
import torch

from trainers import threads
from trainers.threads import ThreadGovernor, read_schedstat


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def feed(governor: ThreadGovernor, t: float, run_ns: int, wait_ns: int, tid: str = "1") -> None:
    governor.after_step(now=t, stats={tid: (run_ns, wait_ns)})


def test_contention_drops_to_one_thread_and_quiet_brings_the_count_back():
    g = ThreadGovernor(enabled=True)
    feed(g, 0.0, 0, 0)
    run = wait = 0
    t = 0.0
    for _ in range(3):  # quiet: no waiting
        t, run = t + 1, run + 10**9
        feed(g, t, run, wait)
    assert torch.get_num_threads() == 2 and g.reductions == 0
    t, run, wait = t + 1, run + 10**9, wait + 10**9  # half the time waiting
    feed(g, t, run, wait)
    assert torch.get_num_threads() == 1 and g.reduced and g.last_wait_share == 0.5
    for _ in range(threads.FIRST_BACKOFF - 1):  # still waiting: stays at one thread
        t, run, wait = t + 1, run + 10**9, wait + 10**9
        feed(g, t, run, wait)
    assert torch.get_num_threads() == 1
    t, run = t + 1, run + 10**9  # contention gone: full count again
    feed(g, t, run, wait)
    assert torch.get_num_threads() == 2 and not g.reduced
    t, run, wait = t + 1, run + 10**9, wait + 10**9  # found again: back off longer
    feed(g, t, run, wait)
    assert g.reductions == 2 and g._windows_left == 2 * threads.FIRST_BACKOFF


def test_judged_once_a_window_and_not_at_all_when_off():
    g = ThreadGovernor(enabled=True)
    feed(g, 0.0, 0, 0)
    feed(g, threads.WINDOW_S / 2, 10**6, 10**9)  # inside the first window: not judged
    assert torch.get_num_threads() == 2
    off = ThreadGovernor(enabled=False)
    feed(off, 0.0, 0, 0)
    feed(off, 10.0, 10**9, 10**10)
    assert torch.get_num_threads() == 2 and "off" in off.describe()


def test_reads_this_process_threads():
    stats = read_schedstat()
    if not stats:
        pytest.skip("no /proc/self/task/*/schedstat here")
    assert all(run >= 0 and wait >= 0 for run, wait in stats.values())
    assert any(run > 0 for run, _ in stats.values())
