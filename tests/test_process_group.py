"""The tensor-parallel ranks' collectives on the CPU: shared-memory slots for small tensors, gloo for large ones,
the same sums either way, and a rank that waits on a flag notices a peer that has gone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time

import pytest
import torch

from nanovllm.engine import process_group
from nanovllm.engine.process_group import SLOT_BYTES, ProcessGroup, process_gone
from nanovllm.engine.tensor_parallel import free_port

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="shared-memory collectives are x86-only"
)


def on_ranks(size: int, work) -> list:
    """work(group) on `size` ranks, one thread each, each with its own group; every rank's result."""
    init, results, errors = f"tcp://127.0.0.1:{free_port()}", [None] * size, []

    def run(rank: int) -> None:
        try:
            results[rank] = work(ProcessGroup(rank, size, init, "cpu"))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("size", [2, 4])
def test_shared_all_reduce_and_gather_agree_with_gloo(size):
    def work(group):
        assert group.shared is not None
        g = torch.Generator().manual_seed(group.rank)
        small = torch.randn(3, 768, generator=g)
        big = torch.randn(SLOT_BYTES // 4 + 1, generator=g)  # one float over a slot: gloo's path
        sums = [group.all_reduce(small.clone()) for _ in range(5)]  # slots used in turn, several times
        half = group.all_reduce(small.to(torch.bfloat16))
        gathered = group.gather_last_dim(torch.full((2, 3), float(group.rank)))
        return small, sums, half, group.all_reduce(big.clone()), big, gathered

    results = on_ranks(size, work)
    expected = sum(r[0] for r in results)
    for _, sums, half, big_sum, _, _ in results:
        assert all(torch.allclose(s, expected, atol=1e-5) for s in sums)
        assert torch.equal(sums[0], results[0][1][0])  # the same bits on every rank
        assert torch.allclose(half.float(), expected, atol=0.1 * size)
        assert torch.allclose(big_sum, sum(r[4] for r in results), atol=1e-4)
    assert torch.equal(results[0][5], torch.arange(size).float().repeat_interleave(3).repeat(2, 1))
    assert all(r[5].shape == (2, 0) for r in results[1:])


class Gone:
    rank, pid, exitcode = 1, 12345, -9

    def is_alive(self) -> bool:
        return False


def test_a_rank_waiting_on_a_flag_notices_a_peer_that_died(monkeypatch):
    monkeypatch.setattr(process_group, "TIMEOUT", process_group.datetime.timedelta(seconds=30))

    def work(group):
        if group.rank == 1:
            return None  # never arrives: as if killed before the all-reduce
        group.children = [Gone()]
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid 12345\) exited with code -9"):
            group.all_reduce(torch.ones(4))
        return "noticed"

    assert on_ranks(2, work)[0] == "noticed"


def test_a_process_that_ended_is_gone_even_before_it_is_reaped():
    assert not process_gone(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it has ended; left unreaped, it is a zombie
    assert process_gone(child.pid)
    child.wait()
    assert process_gone(child.pid)


@pytest.mark.parametrize("path", ["shared memory", "gloo"])
def test_plans_reach_every_rank_however_long_the_engine_idles(monkeypatch, path):
    monkeypatch.setattr(process_group, "TIMEOUT", process_group.datetime.timedelta(seconds=1))
    plans = [(1, torch.arange(5)), (1, torch.arange(SLOT_BYTES // 8)), (0, torch.empty(0, dtype=torch.int64))]

    def work(group):
        if path == "gloo":
            group.shared = None
        if group.rank == 0:
            time.sleep(2.5)  # idle past the collectives' timeout: a waiting rank must not give up
            for command, plan in plans:  # the second is larger than a slot: gloo carries it
                group.send_plan(command, plan)
            return None
        return [group.receive_plan() for _ in plans]

    for received in on_ranks(3, work)[1:]:
        assert [c for c, _ in received] == [c for c, _ in plans]
        assert all(torch.equal(got, sent) for (_, got), (_, sent) in zip(received, plans))
