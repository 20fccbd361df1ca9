"""Optional engine `llama-server`: llama.cpp's own HTTP server, which batches requests continuously (`--parallel N`).

This is llama.cpp as its users serve many requests, so batched workloads compare against it rather than against
llama-cpp-python's one-request-at-a-time path (`llama.cpp`). The benchmark finds the binary ($LLAMA_SERVER, `PATH`,
or what `tools/build_llama_server.sh` built), converts the weights to GGUF as the `llama.cpp` engine does (f32, or
q8_0 / q4_0 for chapter 7: `llama-server-q8_0`), starts the server on a free loopback port with one slot per
sequence the engines under test may run at once, and sends a round's requests all at once, each by its own
streaming client, as token-id prompts: greedy, EOS ignored, `cache_prompt: false` (fresh prompts; the
server keeps a prompt cache otherwise). The server's own defaults are kept (its f16 KV cache, flash attention
`auto`); `info()` records them, and `kv_type="f32"` matches our fp32 KV cache.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.engines import Engine, EngineUnavailable, RunResult
from benchmarks.llamacpp_engine import OUTTYPES, gguf_tensor_types, gguf_type, llama_cpp_cache, make_gguf
from benchmarks.models import ResolvedModel
from benchmarks.server_engine import stream_all
from benchmarks.workloads import Request

BUILD = "tools/build_llama_server.sh (builds it from llama-cpp-python's source distribution: ~15 min on 2 cores)"


def find_llama_server() -> Path | None:
    """$LLAMA_SERVER, `llama-server` on the PATH, or the binary tools/build_llama_server.sh leaves in the cache."""
    built = llama_cpp_cache() / "build/bin/llama-server"
    for cand in (os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"), built):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def default_max_num_seqs() -> int:
    import inspect

    from nanovllm.engine.llm_engine import LLMEngine

    return inspect.signature(LLMEngine).parameters["max_num_seqs"].default


class LlamaServerEngine(Engine):
    name, kind, streams = "llama-server", "llama-server", True

    def __init__(
        self,
        model: ResolvedModel,
        device: str,
        dtype: str,
        outtype: str | None = None,
        parallel: int | None = None,
        ctx_per_slot: int | None = None,
        threads: int | None = None,
        kv_type: str | None = None,
        binary: str | None = None,
        gguf: str | None = None,
        shared: dict | None = None,
    ):
        """`parallel`: slots (default: our engine's default max_num_seqs, the same concurrency); `ctx_per_slot`:
        tokens each slot holds (default: the run's max_model_len, else the model's, capped at 4096); `kv_type`:
        f16 (the server's default), f32, q8_0, ...; `binary`: the llama-server to run; `gguf`: a GGUF file to
        serve as it is (default: the model converted to `outtype`)."""
        import torch

        found = Path(binary) if binary else find_llama_server()
        if found is None or not found.is_file():
            raise EngineUnavailable(f"llama-server: no binary found; set $LLAMA_SERVER or run {BUILD}")
        if device != "cpu":
            raise EngineUnavailable("llama-server: only the CPU is set up here (it would need a CUDA build)")
        shared = shared or {}
        self.binary = found
        self.outtype = gguf_type(outtype or OUTTYPES[dtype])
        self.threads = threads or torch.get_num_threads()
        self.parallel = parallel or shared.get("max_num_seqs") or default_max_num_seqs()
        self.ctx_per_slot = ctx_per_slot or min(shared.get("max_model_len") or model.max_model_len, 4096)
        self.kv_type = kv_type
        self.gguf = Path(gguf) if gguf else make_gguf(model, self.outtype, threads=self.threads)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [str(found), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "--parallel", str(self.parallel), "--ctx-size", str(self.parallel * self.ctx_per_slot),
               "--no-kv-unified", "--threads", str(self.threads), "--threads-batch", str(self.threads),
               "--cache-ram", "0", "--no-webui"]  # fmt: skip
        if kv_type:
            cmd += ["--cache-type-k", kv_type, "--cache-type-v", kv_type]
        self.command = cmd
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=120)
        self.load_mem_bytes = self._proc_memory("VmRSS")  # the server's own process: what loading the model took

    def _proc_memory(self, field: str) -> int | None:
        """VmRSS (now) or VmHWM (peak) of the server process, in bytes; None off Linux."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise EngineUnavailable(f"llama-server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise EngineUnavailable(f"llama-server did not become ready in {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-800:]

    def run(self, requests: list[Request]) -> RunResult:
        longest = max(len(r.prompt) + r.max_tokens for r in requests)
        if longest > self.ctx_per_slot:
            raise EngineUnavailable(f"llama-server: a request needs {longest} tokens, a slot holds {self.ctx_per_slot}")
        before = self._proc_memory("VmRSS")
        result = asyncio.run(self._run(requests))
        after = self._proc_memory("VmRSS")
        result.peak_mem_bytes = self._proc_memory("VmHWM")  # the server's, not this process's
        result.mem_growth_bytes = after - before if after is not None and before is not None else None
        return result

    async def _run(self, requests: list[Request]) -> RunResult:
        def body(r: Request) -> dict:
            return {"prompt": r.prompt, "n_predict": r.max_tokens, "temperature": 0.0, "top_k": 1,
                    "ignore_eos": True, "cache_prompt": False, "stream": True, "return_tokens": True}  # fmt: skip

        def new_tokens(chunk: dict) -> list[int]:
            return chunk.get("tokens") or []

        return await stream_all(f"http://127.0.0.1:{self.port}/completion", requests, body, new_tokens, self.name)

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "binary": str(self.binary),
            "command": " ".join(self.command),
            "gguf": str(self.gguf),
            "outtype": self.outtype,
            "gguf_tensor_types": gguf_tensor_types(self.gguf),
            "threads": self.threads,
            "parallel": self.parallel,
            "ctx_per_slot": self.ctx_per_slot,
            "kv_cache_type": self.kv_type or "f16 (llama-server's default)",
            "batching": f"continuous, {self.parallel} slots",
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
