"""Engines under test: every chapter snapshot that exists (found at run time), transformers, llama.cpp, and
chapters at other git commits (`ch04@d210eab`, run in a worker process: benchmarks/worker.py).

Each engine runs a whole workload and reports what it generated and, when it can stream
(a chapter with add_request/step/has_unfinished), when each request's tokens appeared.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import pkgutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import BenchError
from benchmarks.models import ResolvedModel
from benchmarks.workloads import Request


@dataclass
class RunResult:
    wall_s: float
    token_ids: list[list[int]]  # generated tokens, one list per request
    ttft_s: list[float] | None = None  # per request: submit -> first token (streaming engines only)
    tpot_s: list[float] | None = None  # per request: (last token - first token) / (n - 1)
    forward_passes: int | None = None  # calls of the model's forward during the run (None: cannot tell)
    # memory measured by the engine's own process (a worker); None: the caller measures its own process
    peak_mem_bytes: int | None = None
    mem_growth_bytes: int | None = None
    # tensor parallelism: rank 0's time in collectives (all-reduces, the logits' gather, the plans' broadcasts)
    collective_s: float | None = None
    plan_s: float | None = None  # of which the step plans' broadcasts


class ForwardCounter:
    """Counts calls of a torch module's forward (a forward pre-hook): how many steps an engine took."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.count += 1

    def since(self, start: int) -> int:
        return self.count - start


class Engine:
    """What the benchmark needs from an engine. Subclasses set `name`, `kind` and implement `run`."""

    name: str = "?"
    kind: str = "?"  # "chapter", "transformers", "llama.cpp"
    streams: bool = False  # run() measures per-request TTFT/TPOT itself
    load_mem_bytes: int | None = None  # set by an engine that measures its own loading (a worker process)

    def run(self, requests: list[Request]) -> RunResult:
        raise NotImplementedError

    def progress(self) -> str | None:
        """How far the run in progress has got ('3/16 requests done'), read from another thread; None: unknown."""
        return None

    def kv_cache_bytes(self, requests: list[Request]) -> int | None:
        """KV-cache memory the engine holds (or needs) for this workload; None when it cannot be told."""
        return None

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


def chapter_packages() -> dict[str, str]:
    """Short name -> package of every chapter snapshot that exists: {'ch01': 'chapters.ch01_naive', ...}."""
    import chapters

    found = {}
    for mod in pkgutil.iter_modules(chapters.__path__):
        if mod.ispkg and mod.name[:2] == "ch" and mod.name[2:4].isdigit():
            found[mod.name[:4]] = f"chapters.{mod.name}"
    return dict(sorted(found.items()))


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def known_engines() -> list[str]:
    """Every engine name this machine can run now."""
    from benchmarks.llamacpp_server_engine import find_llama_server

    llamacpp = ["llama.cpp"] if llamacpp_installed() else []
    server = ["llama-server"] if llamacpp and find_llama_server() else []
    return [*chapter_packages(), "transformers", "serve", *llamacpp, *server]


LLAMACPP_NAMES = ("llama.cpp", "llamacpp", "llama-cpp")
LLAMA_SERVER_NAMES = ("llama-server", "llamacpp-server", "llama.cpp-server", "llama-cpp-server")


def canonical_name(name: str) -> str:
    """'ch01', 'ch01_naive', 'chapters.ch01_naive' -> 'ch01'; 'hf' -> 'transformers'; 'llamacpp' -> 'llama.cpp';
    'llamacpp-q8_0' -> 'llama.cpp-q8_0' (a GGUF type); 'ch04_continuous_batching@HEAD~1' -> 'ch04@HEAD~1' (the ref
    is kept as written); inline options stay as written, less spaces: 'ch07 [quantization=int8]' ->
    'ch07[quantization=int8]'."""
    name, inline = split_inline(name)
    name, at, ref = name.strip().partition("@")
    name = name.strip().removeprefix("chapters.")
    if name[:2] == "ch" and name[2:4].isdigit():
        return name[:4] + at + ref.strip() + inline
    for alias in LLAMA_SERVER_NAMES:  # llama.cpp's own server: llama-server, llama-server-q8_0, ...
        if name.lower() == alias:
            return "llama-server" + at + ref + inline
        if name.lower().startswith(alias + "-"):
            return "llama-server-" + _gguf_spelling(name[len(alias) + 1 :]) + at + ref + inline
    for alias in LLAMACPP_NAMES:  # llama.cpp on a quantized GGUF: llamacpp-q4_0, llama.cpp-q8_0, ...
        if name.lower().startswith(alias + "-"):
            return "llama.cpp-" + _gguf_spelling(name[len(alias) + 1 :]) + at + ref + inline
    return {"hf": "transformers", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}.get(name, name) + at + ref + inline


def _gguf_spelling(kind: str) -> str:
    """'Q4_0' -> 'q4_0', so every spelling names one engine (and one baseline); an unknown type is kept as written,
    for check_engine to reject."""
    from benchmarks.llamacpp_engine import gguf_type

    try:
        return gguf_type(kind)
    except BenchError:
        return kind


def split_inline(name: str) -> tuple[str, str]:
    """'ch07[quantization=int8]' -> ('ch07', '[quantization=int8]'): an engine with options of its own, so the same
    engine can run twice in one run with different options (named as a --sweep names its variants)."""
    name = name.strip()
    if not name.endswith("]") or "[" not in name:
        return name, ""
    head, _, inline = name.partition("[")
    return head.strip(), "[" + ",".join(part.strip() for part in split_top_level(inline[:-1])) + "]"


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and parentheses: 'ch04,ch07[a=1,b=(2,3)]' -> ['ch04', 'ch07[a=1,b=(2,3)]'];
    empty parts are dropped."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "[(") - (c in "])")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def engine_base(name: str) -> str:
    """The engine a name runs, without its inline options: 'ch07[quantization=int8]' -> 'ch07'."""
    return split_inline(canonical_name(name))[0]


def inline_options(name: str) -> dict[str, Any]:
    """The options written in an engine's name: 'ch07[quantization=int8,kv_cache_memory=2e8]' ->
    {'quantization': 'int8', 'kv_cache_memory': 200000000.0}; a BenchError for a part that is not KEY=VALUE."""
    _, inline = split_inline(name)
    options = {}
    for part in split_top_level(inline[1:-1]):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise BenchError(f"engine {name!r}: {part!r} is not KEY=VALUE (write ENGINE[KEY=VALUE,KEY=VALUE])")
        options[key.strip()] = literal(value.strip())
    return options


def check_engine(name: str) -> None:
    """A BenchError, in one line, unless `name` is an engine this benchmark knows (llama.cpp counts even when it is
    not installed: it is skipped, saying how to add it). For chNN@REF, REF must be a commit holding chapter NN."""
    from benchmarks.worktrees import chapter_at, resolve_ref, split_ref

    inline_options(name)  # a malformed ENGINE[KEY=VALUE] fails here, before anything runs
    base, ref = split_ref(engine_base(name))
    if ref is not None:
        if base[:2] != "ch" or not base[2:4].isdigit():
            raise BenchError(f"engine {name!r}: only chapters run at a git commit (chNN@REF)")
        chapter_at(resolve_ref(ref), base)
    elif base.startswith(("llama.cpp-", "llama-server-")):
        from benchmarks.llamacpp_engine import gguf_type

        gguf_type(base.partition("-")[2].removeprefix("server-"))  # llama.cpp-q4_0: a GGUF type it can make
    elif base not in (*chapter_packages(), "transformers", "llama.cpp", "llama-server", "serve"):
        raise BenchError(
            f"unknown engine {name!r}; engines here: {', '.join(known_engines())} "
            "(llama.cpp with llama-cpp-python installed), or chNN@REF for a chapter at a git commit"
        )


def parse_option(text: str) -> tuple[str, str, Any]:
    """'ch03:kv_cache_memory=2e8' -> ('ch03', 'kv_cache_memory', 200000000.0); values are Python literals or text."""
    engine, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not key:
        raise ValueError(f"engine option {text!r} is not ENGINE:KEY=VALUE")
    return canonical_name(engine), key.strip(), literal(value.strip())


def engine_options(texts: list[str]) -> dict[str, dict[str, Any]]:
    """Every --engine-opt, grouped by engine: ['ch03:a=1', 'ch03:b=2'] -> {'ch03': {'a': 1, 'b': 2}}."""
    options: dict[str, dict[str, Any]] = {}
    for text in texts:
        engine, key, value = parse_option(text)
        options.setdefault(engine, {})[key] = value
    return options


def literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def create_engine(
    name: str,
    model: ResolvedModel,
    device: str,
    dtype: str,
    options: dict[str, Any],
    shared: dict[str, Any] | None = None,
) -> Engine:
    """Load engine `name` on the model; raises EngineUnavailable (with the reason) when it cannot run here.

    `shared`: settings for every chapter that accepts them (see ChapterEngine). Options written in the name
    (`ch07[quantization=int8]`) come under `options`."""
    options = {**inline_options(name), **options}
    base = engine_base(name)
    if base.startswith("llama.cpp-"):  # llama.cpp-q4_0: llama.cpp on a GGUF of that type
        options = {"outtype": base.removeprefix("llama.cpp-"), **options}
        base = "llama.cpp"
    if base.startswith("llama-server-"):  # llama-server-q8_0: llama-server on a GGUF of that type
        options = {"outtype": base.removeprefix("llama-server-"), **options}
        base = "llama-server"
    if "@" in base:  # a chapter at another commit: its own process, its own checkout
        from benchmarks.worker import WorkerEngine

        return WorkerEngine(base, model, device, dtype, options, shared)
    if base == "serve":  # the final engine behind its HTTP server
        from benchmarks.server_engine import ServerEngine

        return ServerEngine(model, device, dtype, shared=shared, **options)
    if base == "transformers":
        from benchmarks.hf_engine import TransformersEngine

        return TransformersEngine(model, device, dtype, **options)
    if base == "llama-server":
        from benchmarks.llamacpp_server_engine import LlamaServerEngine

        return LlamaServerEngine(model, device, dtype, shared=shared, **options)
    if base == "llama.cpp":
        from benchmarks.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(model, device, dtype, **options)
    packages = chapter_packages()
    if base not in packages:
        raise EngineUnavailable(f"{name}: no such engine here (known: {', '.join(known_engines())})")
    return ChapterEngine(base, packages[base], model, device, dtype, shared=shared, **options)


def preload(name: str) -> None:
    """Import an engine's code, so the memory measured while loading it is its own, not the imports'."""
    base = engine_base(name)  # chNN@REF: nothing to import here, its worker imports its own code
    packages = chapter_packages()
    if base in packages:
        importlib.import_module(packages[base])
    elif base == "transformers":
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401


class EngineUnavailable(RuntimeError):
    """The engine cannot run on this machine (not installed, not written yet); the message says why."""


class ChapterEngine(Engine):
    """A chapter snapshot through its public API: `LLM(...)`, `generate`, and (chapter 4 on) `add_request`/`step`."""

    kind = "chapter"

    def __init__(
        self,
        name: str,
        package: str,
        model: ResolvedModel,
        device: str,
        dtype: str,
        stream: bool = True,
        shared: dict[str, Any] | None = None,
        **chapter_options: Any,
    ):
        """`shared`: settings given to every chapter that takes them (max_model_len, kv_cache_memory), under
        this engine's own `chapter_options`."""
        mod = importlib.import_module(package)
        self.name, self.package, self.SamplingParams = name, package, mod.SamplingParams
        accepted = inspect.signature(mod.LLM).parameters
        common = {k: v for k, v in (shared or {}).items() if k in accepted and v is not None}
        if unknown := sorted(set(chapter_options) - set(accepted)):
            takes = ", ".join(k for k in accepted if k not in ("self", "model"))
            raise BenchError(f"engine {name!r}: {package}.LLM takes no option {unknown[0]!r} (it takes: {takes})")
        self.options = {**common, **chapter_options}
        try:
            self.llm = mod.LLM(str(model.path), **{"dtype": dtype, "device": device, "seed": 0, **self.options})
        except (TypeError, ValueError) as e:  # an option's value the engine refuses, in the engine's words
            raise BenchError(f"engine {name!r}: {e}") from None
        self.streams = stream and all(hasattr(self.llm, a) for a in ("add_request", "step", "has_unfinished"))
        model = getattr(self.llm, "model", None)
        self.passes = ForwardCounter(model) if isinstance(model, torch.nn.Module) else None
        self.done = self.total = self.passes_at_start = 0  # progress of the run in flight

    def params(self, r: Request):
        return self.SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)

    def run(self, requests: list[Request]) -> RunResult:
        start = self.passes.count if self.passes else 0
        self.done, self.total, self.passes_at_start = 0, len(requests), start
        runner = getattr(self.llm, "runner", None)
        group = getattr(runner, "group", None)  # a tensor-parallel engine's process group
        collectives = (group.seconds, runner.plan_seconds) if group is not None else None
        if self.streams:
            result = self._run_streaming(requests)
        else:
            with counting_bar(self):
                t0 = time.perf_counter()
                outs = self.llm.generate(
                    [r.prompt for r in requests], [self.params(r) for r in requests], use_tqdm=False
                )
                result = RunResult(time.perf_counter() - t0, [list(o["token_ids"]) for o in outs])
        self.done = self.total
        if self.passes:
            result.forward_passes = self.passes.since(start)
        if collectives is not None:
            result.collective_s = group.seconds - collectives[0]
            result.plan_s = runner.plan_seconds - collectives[1]
        return result

    def progress(self) -> str | None:
        passes = f", {self.passes.since(self.passes_at_start)} forward passes" if self.passes else ""
        return f"{self.done}/{self.total} requests done{passes}"

    def _run_streaming(self, requests: list[Request]) -> RunResult:
        t0 = time.perf_counter()
        ids = [self.llm.add_request(r.prompt, self.params(r)) for r in requests]
        index = {rid: i for i, rid in enumerate(ids)}
        tokens: list[list[int]] = [[] for _ in requests]
        first = [0.0] * len(requests)
        last = [0.0] * len(requests)
        while self.llm.has_unfinished():
            produced = self.llm.step()
            now = time.perf_counter()
            for rid, new in step_tokens(produced):
                i = index[rid]
                if new and not tokens[i]:
                    first[i] = now
                tokens[i].extend(new)
                last[i] = now
                if new and len(tokens[i]) == requests[i].max_tokens:
                    self.done += 1
        wall = time.perf_counter() - t0
        ttft = [f - t0 for f in first]
        tpot = [(la - f) / (len(t) - 1) if len(t) > 1 else 0.0 for f, la, t in zip(first, last, tokens)]
        return RunResult(wall, tokens, ttft, tpot)

    def kv_cache_bytes(self, requests: list[Request]) -> int | None:
        if self.name == "ch01":
            return 0  # no cache: K and V are recomputed every step
        reported = getattr(self.llm, "kv_cache_bytes", None)
        if reported is not None:
            return int(reported() if callable(reported) else reported)
        return find_kv_tensors_bytes(self.llm)

    def close(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)  # tensor-parallel workers stop with the benchmark's engine
        if shutdown is not None:
            shutdown()

    def info(self) -> dict[str, Any]:
        info = {"kind": self.kind, "package": self.package, "options": self.options, "streams": self.streams}
        graphs = getattr(getattr(self.llm, "runner", None), "graphs", None)
        if graphs is not None:  # chapter 6 on: decode steps from static buffers (CUDA graphs on a GPU)
            info["decode_graphs"] = {
                "buckets": list(graphs.buckets),
                "captured": sorted(getattr(graphs, "graphs", {})),  # none on a CPU: replayed eagerly there
                "capture_seconds": getattr(graphs, "capture_seconds", None),
                "graph_memory_bytes": getattr(graphs, "graph_memory", None),
            }
        return info


@contextlib.contextmanager
def counting_bar(engine: ChapterEngine) -> Iterator[None]:
    """While a chapter's `generate` runs, its module's `tqdm` is a bar that draws nothing and counts finished requests
    into the engine's progress. Chapters before 4 do not stream, and their own progress bar is the one place that
    knows how many requests are done; counting it leaves the timed work as it was (a disabled tqdm does as little)."""
    generate = getattr(type(engine.llm), "generate", None)
    module = sys.modules.get(getattr(generate, "__module__", None) or "")
    saved = getattr(module, "tqdm", None)
    if saved is None:
        yield
        return
    module.tqdm = type("CountingBar", (_CountingBar,), {"counts_into": engine})
    try:
        yield
    finally:
        module.tqdm = saved


class _CountingBar:
    """What the chapters use of tqdm: iterate (an item is done when the next is asked for), update(n), with, close."""

    counts_into: ChapterEngine

    def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any):
        self.iterable = iterable

    def __iter__(self):
        for i, item in enumerate(self.iterable):
            self.counts_into.done = i
            yield item
        self.counts_into.done = self.counts_into.total

    def update(self, n: int = 1) -> None:
        self.counts_into.done += n

    def __enter__(self) -> _CountingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # close, refresh, set_postfix, ...: nothing to draw
        return lambda *args, **kwargs: None

    @staticmethod
    def write(text: str, *args: Any, **kwargs: Any) -> None:
        print(text, file=sys.stderr)


def step_tokens(produced: Any) -> list[tuple[Any, list[int]]]:
    """Normalise what `step()` returns to [(request id, new tokens)]: a mapping id -> token(s), or
    a sequence of (id, token(s)) pairs, or of objects/dicts with a request id and token ids."""
    if produced is None:
        return []
    items = produced.items() if hasattr(produced, "items") else produced
    out = []
    for item in items:
        if isinstance(item, tuple) and len(item) >= 2:
            rid, new = item[0], item[1]
        else:
            get = item.get if isinstance(item, dict) else lambda k, d=None, it=item: getattr(it, k, d)
            rid = next(get(k) for k in ("request_id", "seq_id", "id") if get(k) is not None)
            new = next((get(k) for k in ("new_token_ids", "token_ids", "tokens", "token") if get(k) is not None), [])
        new = [int(new)] if isinstance(new, int) else [int(t) for t in new]
        out.append((rid, new))
    return out


def find_kv_tensors_bytes(obj: Any, depth: int = 4) -> int | None:
    """Bytes of tensors kept under attribute names that mention kv / cache, in the engine's objects and in the
    modules of its model (a fallback for chapters that do not report `kv_cache_bytes`); None when none."""
    seen: set[int] = set()
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def walk(o: Any, d: int, named_kv: bool) -> None:
        if id(o) in seen or d < 0:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if named_kv:
                add(o)
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x, d - 1, named_kv)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, d - 1, named_kv or _kv_name(str(k)))
        elif isinstance(o, torch.nn.Module):
            for m in o.modules():
                for k, v in [*m._buffers.items(), *vars(m).items()]:
                    if _kv_name(k) and isinstance(v, (torch.Tensor, list, tuple)):
                        walk(v, 2, True)
        elif hasattr(o, "__dict__"):
            for k, v in vars(o).items():
                walk(v, d - 1, named_kv or _kv_name(k))

    walk(obj, depth, False)
    return sum(storages.values()) or None


def _kv_name(name: str) -> bool:
    name = name.lower().strip("_")
    return "kv" in name or "cache" in name or name in ("k", "v", "keys", "values")
