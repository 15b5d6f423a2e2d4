"""The thread count: fewer threads while other processes take cores."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from kvflow.worker.threads import CpuTimes, ThreadGovernor, read_cpu_times


class FakeMachine:
    """Cumulative CPU seconds that advance as the test says, on a clock it moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0
        self.own = 0.0
        self.set_to: list[int] = []

    def run(self, seconds: float, others: float, own: float) -> None:
        """seconds pass with other processes on `others` cores and this one on `own`."""
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def governor(self, max_threads: int, cores: int) -> ThreadGovernor:
        return ThreadGovernor(max_threads, interval_s=0.5,
                              read=lambda: CpuTimes(self.busy, self.own),
                              clock=lambda: self.now, set_threads=self.set_to.append,
                              cores=cores)


def test_it_runs_on_the_cores_other_processes_leave_and_comes_back_when_they_leave():
    machine = FakeMachine()
    governor = machine.governor(max_threads=4, cores=4)
    machine.run(1.0, others=0.3, own=4)
    assert governor.poll() == 4 and machine.set_to == []  # a fraction of a core is slack
    machine.run(1.0, others=1.0, own=3)
    assert governor.poll() == 3 and machine.set_to == [3]
    machine.run(1.0, others=2.6, own=1.4)
    assert governor.poll() == 1
    machine.run(1.0, others=6.0, own=1)  # more than the machine: still one thread
    assert governor.poll() == 1
    machine.run(1.0, others=0.0, own=1)
    assert governor.poll() == 4 and machine.set_to == [3, 1, 4]
    assert governor.others == 0.0


def test_it_measures_once_per_interval_and_never_above_its_maximum():
    machine = FakeMachine()
    governor = machine.governor(max_threads=2, cores=8)
    machine.run(0.2, others=7.0, own=1)
    assert governor.poll() == 2 and machine.set_to == []  # before the first interval ends
    machine.run(0.4, others=7.0, own=1)
    assert governor.poll() == 1
    machine.run(0.6, others=0.0, own=2)
    assert governor.poll() == 2  # all 8 cores free, at most 2 threads


def test_without_proc_it_keeps_its_count():
    governor = ThreadGovernor(2, read=lambda: None, set_threads=lambda n: pytest.fail())
    assert not governor.active and governor.poll() == 2


@pytest.mark.skipif(read_cpu_times() is None, reason="no /proc to read")
def test_a_busy_process_beside_it_takes_a_thread_away():
    """On this machine's own /proc: a busy loop on every core but one leaves one thread."""
    from kvflow.worker.threads import physical_cores

    cores = physical_cores()
    if cores < 2:
        pytest.skip("one core: one thread whatever runs beside it")
    set_to: list[int] = []
    governor = ThreadGovernor(cores, interval_s=0.5, set_threads=set_to.append)
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(cores)]
    try:
        time.sleep(1.0)
        assert governor.poll() < cores, governor.others
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert set_to and set_to[-1] < cores
    assert torch.get_num_threads() >= 1
