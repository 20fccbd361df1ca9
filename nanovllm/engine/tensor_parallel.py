"""Tensor parallelism, the engine's side: the worker processes and each step's plan, which rank 0 (the only rank that
schedules and samples) broadcasts as one small tensor of integers (the ranks' collectives: process_group.py).

Rank 0 is the engine's own process. `LLMEngine(tensor_parallel_size=N)` spawns ranks 1..N-1; every rank loads its
shard of the model (models/sharding.py) and builds its own KV pool, holding its share of the KV heads, with the same
number of blocks, so the block tables rank 0's block manager hands out are valid on every rank. A step is then:

    rank 0: schedule, lay the batch out, broadcast the plan ──► every rank: forward its shard
            (all-reduce after attention and after the MLP, in every layer) ──► rank 0 gathers the logits, samples

The plan is a command and one int64 tensor (token ids, positions, slots, logit rows, copy-on-write pairs, block
tables), sent through shared memory on one machine (gloo across machines); `ProcessGroup.seconds` counts the time
spent in collectives on rank 0, `TensorParallelRunner.plan_seconds` the part of it spent sending plans.
With torchrun (several machines), every process runs the user's script; `LLMEngine(...)` on a rank other than 0
serves steps until rank 0 shuts down, then exits (README.md, "Beyond one device", has the flags).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanovllm.engine.io import context_length
from nanovllm.engine.kv_cache import KVPool, pool_for_model
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.process_group import ProcessGroup
from nanovllm.kernels.cpu import LINEAR_KERNEL_MAX_ROWS
from nanovllm.layers.linear import use_linear_kernel_
from nanovllm.layers.paged_attention import PrefillChunk, StepLayout
from nanovllm.models.decode_step import decode_step_rows, use_decode_step_
from nanovllm.models.fused import use_decode_kernels_
from nanovllm.models.sharding import shard_config
from nanovllm.utils.loader import LoadedModel, load_model

STOP, STEP = 0, 1


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank stopped; the engine has shut the others down and cannot run steps any more."""


@dataclass
class ShardSpec:
    """What every rank builds: the load_model arguments, the KV pool's sizing and the runner's backends. Picklable:
    it is what a worker process is started with."""

    model: Any  # a short name, a folder or a checkpoint path
    load: dict[str, Any] = field(default_factory=dict)  # dtype, device, fuse_projections, quantization, ...
    linear_kernel: str | None = None
    pool: dict[str, Any] = field(default_factory=dict)  # block_size, kv_cache_memory, ... (pool_for_model's)
    attention_backend: str = "auto"
    allowed_backends: tuple[str, ...] = ()
    threads: int = 1


def build_shard(spec: ShardSpec, group: ProcessGroup | None) -> tuple[LoadedModel, str, KVPool]:
    """One rank's model (its shard), the linear kernel it uses, and its KV pool, with as many blocks as every
    other rank's (the smallest any rank could hold)."""
    loaded = load_model(spec.model, **spec.load, tensor_parallel=group)
    linear_kernel = use_linear_kernel_(loaded.model, spec.linear_kernel, spec.load["device"])
    # chapter 6's C kernels for the small operations go with its C matmuls (both: the fixed cost of a decode step)
    use_decode_kernels_(loaded.model, linear_kernel == "c", LINEAR_KERNEL_MAX_ROWS)
    size = group.size if group is not None else 1
    dtype = loaded.model.model.embed_tokens.weight.dtype  # the activations' dtype (a quantized lm_head has none)
    kv_dtype = kv_cache_dtype(spec.pool.get("kv_cache_dtype", "auto"), dtype, spec.load["device"])
    max_model_len = context_length(loaded.config.max_model_len, spec.pool["max_model_len"])
    pool = pool_for_model(
        shard_config(loaded.config, size),  # this rank's KV heads
        kv_dtype,
        spec.load["device"],
        spec.pool["block_size"],
        spec.pool["kv_cache_memory"],
        spec.pool["gpu_memory_utilization"],
        16 * max_model_len,  # on CPU, by default, room for 16 sequences of the full context
        max_model_len=max_model_len,
    )
    if group is not None:
        blocks = group.all_reduce_min(pool.num_blocks)
        if blocks < pool.num_blocks:
            k = pool.k
            pool = KVPool(k.shape[0], blocks, pool.block_size, k.shape[3], k.shape[4], k.dtype, k.device)
    # chapter 6's replay of a whole decode step in C, for one process (a rank's layers all-reduce between them)
    use_decode_step_(loaded.model, pool, linear_kernel == "c" and group is None, decode_step_rows(loaded.model))
    return loaded, linear_kernel, pool


def kv_cache_dtype(asked: str, model_dtype: torch.dtype, device: str) -> torch.dtype:
    """The KV pool's dtype: the model's ('auto'), or bfloat16. On a GPU the attention kernels read the pool in the
    model's dtype, so there bfloat16 needs a bfloat16 model."""
    if asked == "auto" or model_dtype == torch.bfloat16:
        return model_dtype
    if torch.device(device).type != "cpu":
        raise ValueError(f"kv_cache_dtype='bfloat16' on {device} needs dtype='bfloat16' (the model is {model_dtype})")
    return torch.bfloat16


def threads_per_rank(size: int, device: str) -> int:
    """Threads each CPU rank computes with: this process's torch threads, but no more than the cores this process may
    run on divided among the ranks (two ranks of 2 threads each on 2 cores would fight for them, and a rank waiting
    at an all-reduce for a descheduled peer makes every step slower)."""
    threads = torch.get_num_threads()
    if not str(device).startswith("cpu"):  # GPUs (or a device the loader is about to refuse, in words)
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(threads, cores // size))


def encode_step(ids: torch.Tensor, layout: StepLayout, rows: list[int], copies: list[tuple[int, int]]) -> torch.Tensor:
    """One step's plan as an int64 tensor: a header of counts, the rows' ids, positions and slots, then the
    logit rows, copy-on-write pairs, decode block tables and prefill chunks, each table preceded by its length."""
    rest = list(rows) + [b for pair in copies for b in pair]
    for table in layout.decode_tables:
        rest += [len(table), *table]
    for c in layout.prefills:
        rest += [c.first, c.num_tokens, c.start, len(c.block_table), *c.block_table]
    head = [ids.shape[1], len(rows), len(copies), len(layout.decode_tables), len(layout.prefills)]
    device = layout.positions.device
    tail = torch.tensor(head + rest, dtype=torch.int64, device=device)
    return torch.cat([tail[:5], ids[0], layout.positions, layout.slots, tail[5:]])


def decode_step(plan: torch.Tensor) -> tuple[torch.Tensor, StepLayout, list[int], list[tuple[int, int]]]:
    """encode_step's inverse: (ids (1, N), the layout, the logit rows, the copy-on-write pairs)."""
    n, num_rows, num_copies, num_decodes, num_prefills = plan[:5].tolist()
    ids, positions, slots = plan[5 : 5 + n], plan[5 + n : 5 + 2 * n], plan[5 + 2 * n : 5 + 3 * n]
    rest = plan[5 + 3 * n :].tolist()
    rows, i = rest[:num_rows], num_rows
    copies = list(zip(rest[i : i + 2 * num_copies : 2], rest[i + 1 : i + 2 * num_copies : 2]))
    i += 2 * num_copies
    tables = []
    for _ in range(num_decodes):
        tables.append(rest[i + 1 : i + 1 + rest[i]])
        i += 1 + rest[i]
    chunks = []
    for _ in range(num_prefills):
        first, num_tokens, start, length = rest[i : i + 4]
        chunks.append(PrefillChunk(first, num_tokens, start, rest[i + 4 : i + 4 + length]))
        i += 4 + length
    return ids[None], StepLayout(slots=slots, positions=positions, decode_tables=tables, prefills=chunks), rows, copies


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: sends each step's plan to the other ranks, then runs its own shard with them.
    Dropped without shutdown(), it stops its workers (they would otherwise wait for a plan forever)."""

    def __del__(self):
        if getattr(self, "workers", None):
            self.shutdown()

    def __init__(self, model, pool, group: ProcessGroup, workers: list, attention_backend: str, allowed, threads=1):
        super().__init__(model, pool, attention_backend, allowed)
        self.group, self.workers, self.broken = group, workers, None
        self.threads = threads  # rank 0's share of the cores, for its steps only: the process keeps its own count
        self.plan_seconds = 0.0  # of group.seconds: sending the plans

    def forward(self, ids, layout, rows, copies) -> torch.Tensor:
        if self.broken:
            raise WorkerDiedError(self.broken)
        try:
            start = time.perf_counter()
            self._send(STEP, encode_step(ids, layout, rows, copies))
            self.plan_seconds += time.perf_counter() - start
            return self._forward_with_share(ids, layout, rows, copies)
        except BaseException as e:  # the ranks are out of step now: nothing can be run again
            self.broken = self._why(e)
            self.shutdown(send_stop=False)
            raise WorkerDiedError(self.broken) from e

    def _forward_with_share(self, ids, layout, rows, copies) -> torch.Tensor:
        process_threads = torch.get_num_threads()
        if process_threads == self.threads:
            return super().forward(ids, layout, rows, copies)
        torch.set_num_threads(self.threads)
        try:
            return super().forward(ids, layout, rows, copies)
        finally:
            torch.set_num_threads(process_threads)

    def _send(self, command: int, plan: torch.Tensor) -> None:
        self.group.send_plan(command, plan)

    def _why(self, error: BaseException) -> str:
        """Which rank stopped first: one killed by a signal, else one that failed (the others then fail on it)."""
        ended = []
        for rank, proc in enumerate(self.workers, start=1):
            proc.join(timeout=1.0)
            if proc.exitcode is not None:
                ended.append((proc.exitcode >= 0, proc.exitcode == 0, rank, proc))
        if ended:
            _, _, rank, proc = min(ended, key=lambda e: e[:3])
            return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}; engine stopped"
        return f"a tensor-parallel step failed on rank 0 ({type(error).__name__}: {error}); engine stopped"

    def shutdown(self, send_stop: bool = True) -> None:
        """Stop every worker (STOP to those listening; terminate what is left) and reap them: no process hangs."""
        if send_stop and not self.broken:
            try:
                self._send(STOP, torch.empty(0, dtype=torch.int64))
            except Exception:
                pass
        for proc in self.workers:
            proc.join(timeout=5.0 if send_stop else 0.1)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        self.workers = []
        self.broken = self.broken or "the engine was shut down"


def serve(runner: ModelRunner, group: ProcessGroup) -> None:
    """A worker's loop: run each step rank 0 sends, until it says stop."""
    while True:
        try:
            command, plan = group.receive_plan()
        except RuntimeError:  # rank 0 went away between steps (its process ended): nothing left to serve
            return
        if command == STOP:
            return
        with torch.inference_mode():
            runner.forward(*decode_step(plan))


def worker_main(rank: int, size: int, init_method: str, spec: ShardSpec) -> None:
    """A spawned rank: build its shard, serve steps. Any failure ends the process (rank 0's collective then fails
    and says so) rather than leaving the others waiting."""
    try:
        torch.set_num_threads(spec.threads)
        device = spec.load["device"]
        if torch.device(device).type == "cuda":
            device = f"cuda:{rank}"
            torch.cuda.set_device(rank)
            spec.load = {**spec.load, "device": device}
        group = ProcessGroup(rank, size, init_method, device)
        loaded, _, pool = build_shard(spec, group)
        group.seconds = 0.0
        serve(ModelRunner(loaded.model, pool, spec.attention_backend, spec.allowed_backends), group)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)  # no interpreter teardown: nothing left to flush, and it cannot hang on a dead peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_rank(size: int) -> int | None:
    """This process's rank when torchrun started it for a tensor-parallel group of `size`, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == size:
        return int(os.environ["RANK"])
    return None


class Worker:
    """A rank's process, started as `python -c` running worker_main: a fresh interpreter that never imports the
    user's script (multiprocessing's spawn would, and run its unguarded top level again). The ShardSpec goes in
    on stdin, pickled."""

    def __init__(self, rank: int, size: int, init_method: str, spec: ShardSpec):
        self.rank = rank
        root = str(Path(__file__).resolve().parents[2])  # where nanovllm is importable from, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        code = f"import sys, pickle; from {__name__} import worker_main; worker_main({rank}, {size}, "
        code += f"{init_method!r}, pickle.load(sys.stdin.buffer))"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, env=env)
        self.proc.stdin.write(pickle.dumps(spec))
        self.proc.stdin.close()
        self.pid = self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.proc.kill()  # a rank blocked in a collective would not act on a gentler signal soon
        self.join()


def start(size: int, spec: ShardSpec) -> tuple[ProcessGroup, list[Worker]]:
    """Rank 0's group, with ranks 1..size-1 started as processes here (or, under torchrun, already running:
    a rank other than 0 serves here and exits, never returning)."""
    rank = torchrun_rank(size)
    if rank is not None:  # torchrun set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE for every process
        if rank:
            worker_main(rank, size, "env://", spec)
        return ProcessGroup(0, size, "env://", spec.load["device"]), []
    init_method = f"tcp://127.0.0.1:{free_port()}"
    workers = [Worker(r, size, init_method, spec) for r in range(1, size)]
    try:
        group = ProcessGroup(0, size, init_method, spec.load["device"])
        group.children = workers
        return group, workers
    except BaseException:
        for worker in workers:
            worker.terminate()
        raise
