"""Torch's threads for an analysis (normscope.threads): lowered to the free cores while other
processes keep the machine busy, never raised, and the caller's count restored, also on error."""

import multiprocessing
import time

import pytest
import torch

import normscope
from normscope.models import build_model
from normscope.threads import busy_elsewhere, cores, fitting_threads

pytestmark = pytest.mark.skipif(busy_elsewhere() is None, reason="no /proc/loadavg on this system")


def _spin() -> None:
    while True:
        pass


@pytest.fixture
def busy_cores():
    """One spinning process per core, until the test ends."""
    workers = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(cores())]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 20
    while busy_elsewhere() < cores() and time.monotonic() < deadline:
        time.sleep(0.1)  # the spawned interpreters start spinning after their imports
    yield
    for worker in workers:
        worker.kill()
        worker.join()


def test_a_busy_machine_gets_one_thread_and_the_callers_count_comes_back(busy_cores):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fitting_threads() as used:
            assert used["busy"] >= cores() and used["threads"] == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), fitting_threads():
            raise RuntimeError("an analysis failing")
        assert torch.get_num_threads() == 2
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        result = normscope.analyze(build_model("mlp_bn"), (x, y), analyzers="stats", batch_size=16, batches=1)
        assert result.meta["threads"]["threads"] == 1 and result.meta["threads"]["default"] == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_are_never_raised():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fitting_threads() as used:
            assert used["threads"] == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
