"""The command line: `nanovllm generate PROMPT...`, `serve [MODEL]`, `chat [MODEL]` and `bench`."""

from __future__ import annotations

import argparse
import sys
import time

from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import QUANTIZATIONS

SEPARATOR = "-" * 40  # between the texts of several prompts


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, a flag's False) or where the
    help text already says it in words ("(default: this machine only)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="nano-vLLM: a small, real LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt texts (each is continued separately, in one batch)")
    gen.add_argument(
        "--model",
        default="default",
        help="'default' (ships with nano-vLLM), a Hugging Face model folder or hub id (org/name), or a llama2.c .bin",
    )
    gen.add_argument("--max-tokens", type=int, default=64, help="most new tokens per prompt")
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="0 for greedy. Python's SamplingParams defaults to 1.0, as vLLM's does; here 0.8 keeps the small "
        "models' stories on track",
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1 keeps every token")
    gen.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens; -1 keeps all")
    gen.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (default: a random one)")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt)")
    engine_options(gen)
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra: fastapi, uvicorn)")
    srv.add_argument(
        "model", nargs="?", default="default", help="'default', a Hugging Face folder or hub id, a llama2.c .bin"
    )
    srv.add_argument(
        "--model", dest="model_option", default=None, help="the model, named as an option (as vLLM allows)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route")
    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: the folder's)")
    engine_options(srv)
    chat = sub.add_parser("chat", help="chat in the terminal with a model, or with a running server (--url)")
    chat.add_argument("model", nargs="?", default="default")
    chat.add_argument("--model", dest="model_option", default=None, help="the model, named as an option")
    chat.add_argument("--url", default=None, help="a running nanovllm serve (e.g. http://127.0.0.1:8000)")
    chat.add_argument("--api-key", default=None)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    chat.add_argument("--seed", type=int, default=None)
    engine_options(chat)
    # parsed by the benchmark itself (main hands it everything after `bench`): listed here for --help
    sub.add_parser("bench", add_help=False, help="benchmark engines on a workload (python -m benchmarks; in a clone)")
    for command in sub.choices.values():
        command.formatter_class = DefaultsFormatter
        command.set_defaults(command_parser=command)  # for main's errors: this command's usage, not the top level's
    return parser


def engine_options(parser: argparse.ArgumentParser) -> None:
    """The engine's options every command that loads a model takes."""
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the context: prompt and output (default: the model's own; at most that)")  # fmt: skip
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or bfloat16 (half as big)")
    # no argparse choices: a bad name is then the engine's one-line error, not a usage message
    parser.add_argument("--quantization", default=None, metavar="{" + ",".join(QUANTIZATIONS) + "}",
                        help="weight-only quantization of the linear layers (default: none)")  # fmt: skip
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="shard the model over N processes (CPU: gloo; CUDA: NCCL, a GPU each)")  # fmt: skip


def load_engine(args: argparse.Namespace):
    from nanovllm import LLM

    return LLM(
        args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
    )  # fmt: skip


def serve(args: argparse.Namespace) -> int:
    try:
        from nanovllm.server import serve as run_server
    except ImportError as e:
        raise ValueError(f"`nanovllm serve` needs fastapi and uvicorn: pip install 'nanovllm[serve]' ({e})") from None
    from pathlib import Path

    import uvicorn  # noqa: F401 (checked before the model loads)

    check_can_listen(args.host, args.port)  # before a model that may take minutes to load
    name = args.served_model_name or ("default" if args.model == "default" else Path(args.model).name)
    engine = load_engine(args)
    try:
        run_server(engine, name, args.host, args.port, args.api_key)
    finally:
        engine.shutdown()  # tensor-parallel workers stop with the server
    return 0


def check_can_listen(host: str, port: int) -> None:
    """A port out of range, a host that does not resolve, an address in use: one line now, not uvicorn's log later."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address of this machine: {e}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def chat(args: argparse.Namespace) -> int:
    from nanovllm.chat import run_chat

    return run_chat(args, sys.stdin, sys.stdout)


def generate(args: argparse.Namespace) -> int:
    if args.stream and len(args.prompts) != 1:  # before loading a model that may take a while
        raise ValueError(f"--stream takes one prompt, got {len(args.prompts)}")
    params = SamplingParams(  # checked before the model loads too
        temperature=args.temperature, max_tokens=args.max_tokens, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    llm = load_engine(args)
    with llm:  # stops tensor-parallel workers, if any, however this ends
        return print_generated(llm, args, params)


def print_generated(llm, args: argparse.Namespace, params: SamplingParams) -> int:
    start = time.perf_counter()
    if args.stream:
        outputs = [stream(llm, args.prompts[0], params)]
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
        for i, (prompt, out) in enumerate(zip(args.prompts, outputs)):
            if i:
                print(SEPARATOR)
            print(f"{prompt}\033[1m{out['text']}\033[0m" if sys.stdout.isatty() else prompt + out["text"], flush=True)
            print_finish(out)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o["token_ids"]) for o in outputs)
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.0f} tok/s; {llm.pool.describe()}]", file=sys.stderr)
    return 0


def stream(llm, prompt: str, params: SamplingParams) -> dict:
    """The prompt, then its continuation printed piece by piece as the engine's steps produce it."""
    request = llm.add_request(prompt, params)
    print(prompt, end="", flush=True)
    while llm.has_unfinished():
        for out in llm.step():
            print(out.text, end="", flush=True)
    print(flush=True)
    result = llm.output(request)
    llm.release(request)
    print_finish(result)
    return result


def print_finish(out: dict) -> None:
    """Why a prompt's text ended, on stderr (stdout stays the text alone, for a pipe): stop (EOS, a stop string or
    id) or length (--max-tokens, or the context is full)."""
    n = len(out["token_ids"])
    print(f"[{out['finish_reason']}, {n} token{'s' if n != 1 else ''}]", file=sys.stderr, flush=True)


def bench(argv: list[str]) -> int:
    """`nanovllm bench ARGS` is `python -m benchmarks ARGS`. The benchmark ships with a clone of the repository, not
    with the package: it is imported from the working folder, else from beside the `nanovllm` in use (an editable
    install of a clone)."""
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "benchmarks" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            break
    try:
        from benchmarks.cli import main as benchmark
    except ImportError as e:
        print(
            f"nanovllm: error: `nanovllm bench` needs the benchmarks package of a clone of nano-vLLM ({e}): "
            "run it inside the clone",
            file=sys.stderr,
        )
        return 2
    return benchmark(argv, prog="nanovllm bench")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own arguments (`nanovllm bench --help` is its help)
        return bench(argv[1:])
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # parse_args would blame the top-level parser and print its usage, not the subcommand's
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "model_option", None) is not None:  # `serve --model M` is `serve M`; both must agree
        if args.model not in ("default", args.model_option):
            args.command_parser.error(f"two models named: {args.model!r} and --model {args.model_option!r}")
        args.model = args.model_option
    try:
        return {"generate": generate, "serve": serve, "chat": chat}[args.command](args)
    except (ValueError, FileNotFoundError, TypeError) as e:  # bad input: one clear line, no traceback
        message = " ".join(str(e).splitlines())  # one line, whatever the message
        print(f"nanovllm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
