"""`nanovllm chat`: a conversation in the terminal, with a model loaded here or with a running server (--url).

Each answer streams as it is generated; the conversation is kept and sent whole each turn; `/reset` starts over,
and Ctrl-D (end of input) leaves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TextIO

from nanovllm.sampling_params import SamplingParams
from nanovllm.server_api import chat_prompt

HELP = "(type a message; /reset starts over; Ctrl-D leaves)"


def local_replies(args) -> callable:
    """A function from the conversation so far to the answer's pieces, with an engine loaded here."""
    from nanovllm.cli import load_engine

    llm = load_engine(args)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)

    def reply(messages: list[dict]) -> Iterator[str]:
        rid = llm.add_request(chat_prompt({"messages": messages}, llm.tokenizer), params)
        try:
            while not llm.requests[rid].is_finished:
                for out in llm.step():
                    if out.request_id == rid and out.text:
                        yield out.text
        finally:
            llm.release(rid)

    return reply


def remote_replies(args) -> callable:
    """The same, through a running server's /v1/chat/completions, streamed as server-sent events."""
    import httpx

    if not args.url.startswith(("http://", "https://")):  # before the first prompt, not after it
        raise ValueError(f"--url must start with http:// or https://, got {args.url!r}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/") + "/v1/chat/completions"

    def reply(messages: list[dict]) -> Iterator[str]:
        body = {"messages": messages, "stream": True, "max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.seed is not None:
            body["seed"] = args.seed
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
                if response.status_code != 200:
                    response.read()
                    raise ValueError(f"the server answered {response.status_code}: {response.text}")
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise ValueError(f"the server failed: {event['error'].get('message')}")
                    for choice in event.get("choices", []):
                        if text := choice.get("delta", {}).get("content"):
                            yield text
        except httpx.TransportError as e:  # not running, gone mid-answer, timed out: one line, not a traceback
            raise ValueError(f"no answer from the server at {args.url}: {type(e).__name__}: {e}") from None

    return reply


def run_chat(args, stdin: TextIO, stdout: TextIO) -> int:
    reply = remote_replies(args) if args.url else local_replies(args)
    messages: list[dict] = []
    print(HELP, file=stdout, flush=True)
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # Ctrl-D
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = []
            print("(a new conversation)", file=stdout, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        answer = ""
        for piece in reply(messages):
            answer += piece
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
        messages.append({"role": "assistant", "content": answer})
