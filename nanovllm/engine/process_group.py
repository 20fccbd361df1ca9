"""The tensor-parallel ranks' collectives: NCCL on GPUs; on the CPU, shared memory for the small all-reduces and
gathers every step makes, gloo for the rest; and each step's plan, from rank 0 to the others.

gloo sends each all-reduce through a TCP socket and a helper thread: on a small CPU that costs over a millisecond a
call (1.36 ms on 2 cores, two one-thread ranks, a 768-float tensor: `python -m benchmarks.allreduce`), and a decode
step of a 12-layer model makes 25 of them, as much time as the step's own arithmetic. Ranks on one machine can
instead meet in a file mapped into every one's memory: rank r writes its tensor into its slot, raises its flag to
the call's number, waits until every flag has reached that number, then adds the slots in rank order (every rank
gets the same bits). Two sets of slots, used in turn, are enough: a rank can only be one call ahead of the slowest,
since a call cannot end before every rank has raised its flag for it, which a rank does only once it has finished
reading the call before.

The plan goes through rank 0's slot too (through gloo when the ranks share no memory). A rank waiting for it may
wait as long as the engine is idle, so it does not spin: it sleeps in a read from a pipe, into which rank 0 writes a
byte once the plan is in its slot (and which ends, waking it, if rank 0's process ends). No timeout applies.
"""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits this long for a slow rank (a long CPU prefill) at most
IDLE = datetime.timedelta(days=3650)  # a rank waits for the next step's plan as long as the engine is idle
SLOT_BYTES = 4 * 2**20  # a rank's slot: a decode step's activations and logits fit; a long prefill's go by gloo
HEADER = 64  # bytes per rank before the slots: its flag (the last call it wrote) and its pid
yield_core = getattr(os, "sched_yield", lambda: time.sleep(0))  # macOS has no sched_yield


class ProcessGroup:
    """The ranks' collectives, on a group of their own, not torch's global one: several engines can live in one
    process, one after the other. `seconds` is the time this rank spent in them (on CUDA: in launching them)."""

    def __init__(self, rank: int, size: int, init_method: str, device: str):
        self.rank, self.size, self.device = rank, size, torch.device(device)
        store, _, _ = next(dist.rendezvous(init_method, rank, size, timeout=TIMEOUT))
        if self.device.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(store, rank, size)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, size, TIMEOUT)
        # CPU tensors, no timeout: the plans where the ranks share no memory, and the barriers while starting
        self.plans = dist.ProcessGroupGloo(dist.PrefixStore("plans/", store), rank, size, IDLE)
        self.seconds = 0.0
        self.shared = SharedSlots.open(self, store)
        self.children: list = []  # rank 0's worker processes, polled while it waits (a dead one is reaped)

    def _wait(self, work) -> None:
        start = time.perf_counter()
        work.wait()
        self.seconds += time.perf_counter() - start

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors added, in place on every rank (the tensor is contiguous)."""
        if self.shared is not None and self.shared.fits(tensor):
            start = time.perf_counter()
            self.shared.all_reduce(tensor)
            self.seconds += time.perf_counter() - start
            return tensor
        self._wait(self.pg.allreduce([tensor]))
        return tensor

    def all_reduce_min(self, value: int) -> int:
        return int(self._reduce(torch.tensor([value], device=self.device), dist.ReduceOp.MIN).item())

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor.contiguous(), dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self._wait(self.pg.allreduce([tensor], options))
        return tensor

    def send_plan(self, command: int, plan: torch.Tensor) -> None:
        """Rank 0: a command and an int64 plan to every other rank (receive_plan)."""
        plan, start = plan.cpu(), time.perf_counter()
        head = torch.tensor([command, plan.numel()])
        if self.shared is not None:
            message = torch.cat([head, plan])
            fits = self.shared.can_broadcast(message)
            self.shared.broadcast(message if fits else head)
            if not fits:
                self.plans.broadcast(plan, 0).wait()
        else:
            self.plans.broadcast(head, 0).wait()
            if plan.numel():
                self.plans.broadcast(plan, 0).wait()
        self.seconds += time.perf_counter() - start

    def receive_plan(self) -> tuple[int, torch.Tensor]:
        """The other ranks: rank 0's next (command, plan), the plan on this rank's device. Raises RuntimeError when
        rank 0 has gone."""
        if self.shared is not None:
            message = self.shared.broadcast(None)
            command, length = message[:2].tolist()
            plan = message[2:] if message.numel() > 2 or not length else None
        else:
            head = torch.zeros(2, dtype=torch.int64)
            self.plans.broadcast(head, 0).wait()
            (command, length), plan = head.tolist(), None
        if plan is None:
            plan = torch.empty(length, dtype=torch.int64)
            if length:
                self.plans.broadcast(plan, 0).wait()
        return command, plan.to(self.device)

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0: every rank's tensor side by side along the last dimension; the others: an empty (..., 0)."""
        if self.shared is not None and self.shared.fits(tensor):
            start = time.perf_counter()
            parts = self.shared.gather(tensor)
            self.seconds += time.perf_counter() - start
        elif self.rank == 0:
            parts = [torch.empty_like(tensor) for _ in range(self.size)]
            self._wait(self.pg.gather(parts, tensor, 0))
        else:
            self._wait(self.pg.gather([], tensor, 0))
            parts = None
        return torch.cat(parts, dim=-1) if self.rank == 0 else tensor.new_empty(*tensor.shape[:-1], 0)

    def peers_alive(self) -> str | None:
        """None while every other rank runs, else which one has gone (what a rank spinning on a flag checks)."""
        for child in self.children:
            if not child.is_alive():  # polling reaps it: a killed worker is not left a zombie
                return f"rank {child.rank} (pid {child.pid}) exited with code {child.exitcode}"
        for rank, pid in enumerate(self.shared.pids() if self.shared else []):
            if rank != self.rank and process_gone(pid):
                return f"rank {rank} (pid {pid}) is gone"
        return None


class SharedSlots:
    """A file in shared memory that every rank maps: a header per rank (flag, pid), then two sets of slots."""

    @staticmethod
    def open(group: ProcessGroup, store) -> SharedSlots | None:
        """Rank 0 creates the file and the others map it, when every rank runs on this machine (under torchrun
        they may not) and the machine is x86, whose stores reach other cores in program order: the slot's data
        before the flag that says it is there. Elsewhere (ARM, several hosts) gloo does it all."""
        store.set(f"host{group.rank}", socket.gethostname())
        hosts = {store.get(f"host{r}").decode() for r in range(group.size)}
        if len(hosts) > 1 or platform.machine().lower() not in ("x86_64", "amd64"):
            return None
        size = group.size * (HEADER + 2 * SLOT_BYTES)
        if group.rank == 0:
            folder = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
            fd, path = tempfile.mkstemp(prefix="nanovllm-tp-", dir=folder)
            os.ftruncate(fd, size)
            os.close(fd)
            for rank in range(1, group.size):
                os.mkfifo(f"{path}.wake{rank}")
            store.set("shared", path)
        path = store.get("shared").decode()
        with open(path, "r+b") as f:
            buffer = mmap.mmap(f.fileno(), size)
        # the wake-up pipes: opened for reading first (without blocking), then for writing by rank 0
        wake = [] if group.rank == 0 else [os.open(f"{path}.wake{group.rank}", os.O_RDONLY | os.O_NONBLOCK)]
        group.plans.barrier().wait()
        if group.rank == 0:
            wake = [os.open(f"{path}.wake{rank}", os.O_WRONLY) for rank in range(1, group.size)]
            for name in [path] + [f"{path}.wake{rank}" for rank in range(1, group.size)]:
                os.unlink(name)  # what is open or mapped stays, and nothing is left behind if a rank crashes
        group.plans.barrier().wait()  # rank 0 holds the pipes' write ends: a read from now on waits for a byte
        for fd in wake:
            os.set_blocking(fd, True)
        return SharedSlots(group, buffer, wake)

    def __init__(self, group: ProcessGroup, buffer: mmap.mmap, wake: list[int]):
        self.group, self.buffer, self.calls, self.wake = group, buffer, 0, wake
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
        header = raw[: group.size * HEADER].view(torch.int64).view(group.size, HEADER // 8)  # (ranks, 8)
        self.flags, self._pids = header[:, 0], header[:, 1]
        self.slots = raw[group.size * HEADER :].view(2, group.size, SLOT_BYTES)  # (set, rank, bytes)
        self._pids[group.rank] = os.getpid()

    def __del__(self):
        for fd in getattr(self, "wake", []):
            os.close(fd)

    def fits(self, tensor: torch.Tensor) -> bool:
        small = tensor.numel() * tensor.element_size() <= SLOT_BYTES
        return small and tensor.is_contiguous() and tensor.device.type == "cpu"

    def pids(self) -> list[int]:
        return self._pids.tolist()

    def _exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Write this rank's tensor into its slot, wait for every rank's; every rank's, as (ranks, *shape)."""
        nbytes = tensor.numel() * tensor.element_size()
        slots = self._arrive(tensor.view(-1).view(torch.uint8))
        return slots[:, :nbytes].view(tensor.dtype).view(self.group.size, *tensor.shape)  # (ranks, *shape)

    def _arrive(self, data: torch.Tensor | None) -> torch.Tensor:
        """The next call: this rank's bytes into its slot, its flag raised, every other flag waited for; the slots."""
        self._raise_flag(data)
        self._wait_for(self.calls)
        return self.slots[self.calls % 2]

    def _raise_flag(self, data: torch.Tensor | None) -> None:
        self.calls += 1
        if data is not None:
            self.slots[self.calls % 2, self.group.rank, : data.numel()].copy_(data)
        self.flags[self.group.rank] = self.calls

    def can_broadcast(self, message: torch.Tensor) -> bool:
        return (1 + message.numel()) * 8 <= SLOT_BYTES  # the slot holds the length, then the message

    def broadcast(self, message: torch.Tensor | None) -> torch.Tensor:
        """Rank 0: send an int64 message (it fits a slot), and wake the others. The others (None): sleep until
        woken, however long the engine stays idle, and return a copy (the slot is written again two calls later).
        A wait between steps must not spin: a worker would burn a core for as long as nobody sends a request."""
        if self.group.rank == 0:
            self._arrive(torch.cat([torch.tensor([message.numel()]), message]).view(torch.uint8))
            for fd in self.wake:
                os.write(fd, b"\1")
            return message
        self._raise_flag(None)
        if not os.read(self.wake[0], 1):  # end of file: rank 0's process has gone
            raise RuntimeError("tensor-parallel rank 0 is gone")
        self._wait_for(self.calls)  # rank 0 raised its flag before it woke us: no wait
        slot = self.slots[self.calls % 2, 0].view(torch.int64)  # rank 0's: length, then the message
        return slot[1 : 1 + int(slot[0])].clone()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        torch.sum(self._exchange(tensor), dim=0, out=tensor)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        every = self._exchange(tensor)
        return list(every) if self.group.rank == 0 else None  # read (concatenated) before the slots are reused

    def _wait_for(self, call: int) -> None:
        """Spin until every flag reaches `call`, yielding the core while waiting, checking now and then that the
        ranks behind are alive (a dead one would never raise its flag)."""
        spins, start, check = 0, time.monotonic(), 1.0
        while int(self.flags.min()) < call:
            spins += 1
            if spins < 2000:  # about 2 ms: the other ranks are usually a few microseconds away
                yield_core()
                continue
            time.sleep(50e-6)
            waited = time.monotonic() - start
            if waited > check:
                check += 1.0
                gone = self.group.peers_alive()
                if gone is not None:
                    raise RuntimeError(f"tensor-parallel {gone} while rank {self.group.rank} waited for it")
                if waited > TIMEOUT.total_seconds():
                    raise RuntimeError(f"tensor-parallel rank {self.group.rank}: no word from the others in {waited} s")


def process_gone(pid: int) -> bool:
    """True when no process has this pid any more, or it has ended and waits to be reaped (a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # no /proc (macOS): the signal check is all there is
    return state in ("Z", "X")
