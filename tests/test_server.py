"""The OpenAI-compatible server, for real: started on a free loopback port inside the test, spoken to with the
official `openai` client and with raw HTTP; greedy answers equal the offline engine's; errors the OpenAI way;
a bounded load test with disconnecting clients; and `nanovllm chat` driven through stdin."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import random
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import TINY_MODELS

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL = str(TINY_MODELS / "tiny-llama")
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server in a thread, on 127.0.0.1 only; stopped by the fixture."""

    def __init__(self, llm, name: str, api_key: str | None):
        from nanovllm.server import create_app

        self.port = free_port()
        self.app = create_app(llm, name, api_key)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=asyncio.run, args=(self.serve(),), daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    async def serve(self):
        self.loop = asyncio.get_running_loop()  # the server's loop: tests look at its tasks
        await self.server.serve()

    def pending_stream_tasks(self) -> list:
        """Tasks still waiting on the server's loop that feed a stream (each stream's per-request forwarders)."""

        async def pending():
            return [t for t in asyncio.all_tasks() if "stream_events" in t.get_coro().__qualname__]

        return asyncio.run_coroutine_threadsafe(pending(), self.loop).result(timeout=10)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def llm():
    from nanovllm import LLM

    return LLM(MODEL, max_num_seqs=32, block_size=8)


@pytest.fixture(scope="module")
def server(llm):
    s = Server(llm, "tiny-llama", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline():
    """The offline engine's greedy answer to a prompt: what the server must give."""
    from nanovllm import LLM, SamplingParams

    engine = LLM(MODEL)

    def answer(prompt, max_tokens, **options):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, **options)
        return engine.generate([prompt], params, use_tqdm=False)[0]["text"]

    answer.engine = engine  # for the whole result (logprobs, candidates)
    return answer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def serves_the_next_request(server, offline) -> bool:
    """After a bad request: a good one still gets the offline engine's lone-run answer."""
    body = {"prompt": "Once", "max_tokens": 6, "temperature": 0}
    good = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    return good.json()["choices"][0]["text"] == offline("Once", 6)


def idle(llm) -> bool:
    return not llm.has_unfinished() and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


# ---- the official client ---------------------------------------------------------------------------------


def test_completions_equal_the_offline_engine(client, offline, llm):
    r = client.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.choices[0].text == offline("Once upon a time", 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = [1, 55, 77, 99, 12]
    r = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == offline(ids, 10)
    assert idle(llm)


def test_streamed_completions_add_up_to_the_offline_answer(client, offline):
    stream = client.completions.create(
        model="tiny-llama", prompt="The cat sat", max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline("The cat sat", 16)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_with_the_plain_fallback_template(client, offline):
    messages = [{"role": "user", "content": "Hello there"}]
    rendered = "user: Hello there\nassistant:"  # the documented fallback for a model without a chat template
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == offline(rendered, 10)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_completion_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == offline(rendered, 10)


def test_chat_content_as_a_list_of_text_parts(server, client, offline):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    r = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content == offline("user: Hello\nthere\nassistant:", 8)  # parts joined by newlines
    headers = {"Authorization": f"Bearer {KEY}"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for content in ([image], [], [{"type": "text"}], [{"type": "text", "text": 3}], ["hi"], None, 5, "not a message"):
        message = {"role": "user", "content": content} if content != "not a message" else None
        body = {"messages": [message], "max_tokens": 2}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages", (content, reply.text)
    assert "image_url" in httpx.post(server.url + "/v1/chat/completions", headers=headers,
                                     json={"messages": [{"role": "user", "content": [image]}]}).text  # fmt: skip
    assert serves_the_next_request(server, offline)


def test_a_bug_is_a_500_in_openais_shape_and_the_server_carries_on(server, offline, monkeypatch):
    import nanovllm.server

    def broken(body, tokenizer):
        raise RuntimeError("a bug")

    monkeypatch.setattr(nanovllm.server, "chat_prompt", broken)
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, headers=headers)
    assert (
        r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "a bug" in r.json()["error"]["message"]
    )
    assert serves_the_next_request(server, offline)


TEMPLATE = (  # a chat template of the usual kind, which refuses a system message after the first
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_models_chat_template_renders_the_messages(tmp_path):
    """A model whose tokenizer has a chat template: the messages are its rendering, token for token what the
    template's text tokenizes to (transformers 5 returns a dict from apply_chat_template; read as a list, that was
    its two key names), in the server's answers, in /tokenize and in `nanovllm chat`'s prompts."""
    import shutil

    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from nanovllm import LLM, SamplingParams
    from nanovllm.server import create_app
    from nanovllm.server_api import chat_prompt

    folder = tmp_path / "tiny-chat"
    shutil.copytree(MODEL, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    llm = LLM(str(folder))
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    hf = AutoTokenizer.from_pretrained(folder)
    text = hf.apply_chat_template([messages[0], {"role": "user", "content": "Hello\nthere"}], tokenize=False,
                                  add_generation_prompt=True)  # fmt: skip
    assert text == "<|system|>Be brief.\n<|user|>Hello\nthere\n<|assistant|>"
    want = hf(text, add_special_tokens=False)["input_ids"]
    assert chat_prompt({"messages": messages}, llm.tokenizer) == want
    greedy = llm.generate([want], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]["text"]
    with TestClient(create_app(llm, "tiny-chat")) as http:
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == greedy
        assert r.json()["usage"]["prompt_tokens"] == len(want)
        assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == want
        late = [*messages, {"role": "system", "content": "late"}]
        r = http.post("/v1/chat/completions", json={"messages": late})
        assert r.status_code == 400 and "a system message must come first" in r.json()["error"]["message"]


def test_n_stop_and_seeds(client, offline):
    r = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=8, temperature=0, n=3)
    assert len(r.choices) == 3 and len({c.text for c in r.choices}) == 1 and r.choices[0].text == offline("Once", 8)
    full = offline("Once", 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].text == offline("Once", 12, stop=[stop]) and stop not in r.choices[0].text
    a = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=8, temperature=1.0, seed=3, n=2)
    b = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_models_health_and_metrics(server, client, llm):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/health", headers=headers).json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics", headers=headers).text
    metrics = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert metrics["nanovllm_requests_running"] == "0" and metrics["nanovllm_kv_blocks_used"] == "0"
    assert int(metrics["nanovllm_generation_tokens_total"]) > 0
    assert int(metrics['nanovllm_time_to_first_token_seconds_bucket{le="+Inf"}']) > 0


# ---- errors the OpenAI way -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        ('{"prompt": "hi", "max_tokens": 4', 400, None),  # not JSON
        ('["prompt"]', 400, None),
        ('{"model": "gpt-4", "prompt": "hi"}', 404, None),
        ('{"prompt": 5}', 400, "prompt"),
        ('{"prompt": "hi", "temperature": -1}', 400, "temperature"),
        ('{"prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
        ('{"prompt": "hi", "top_p": 0}', 400, "top_p"),
        ('{"prompt": "hi", "n": 0}', 400, "n"),
        ('{"prompt": "hi", "logprobs": 21}', 400, "logprobs"),
        ('{"prompt": "hi", "logprobs": true}', 400, "logprobs"),
        ('{"prompt": "hi", "top_logprobs": 2}', 400, "top_logprobs"),
        ('{"prompt": "hi", "n": 2, "best_of": 1}', 400, "best_of"),
        ('{"prompt": "hi", "best_of": 2, "stream": true}', 400, "best_of"),
        ('{"prompt": "hi", "bogus": 1}', 400, "bogus"),
        ('{"prompt": "hi", "stop": 7}', 400, "stop"),
        ('{"prompt": "hi", "seed": -3}', 400, "seed"),
        ('{"prompt": "hi", "seed": -3, "n": 2}', 400, "seed"),
        ('{"prompt": "hi", "stream": "true"}', 400, "stream"),  # checked before a 200 goes out
        ('{"prompt": "hi", "stream": true, "stream_options": 5}', 400, "stream_options"),
        ('{"prompt": "hi", "stream": true, "stream_options": {"include_usage": "yes"}}', 400, "stream_options"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_engine_carries_on(server, llm, offline, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and (param is None or error["param"] == param)
    assert serves_the_next_request(server, offline) and idle(llm)


def test_null_means_the_default_and_a_top_seed_wraps(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once", "max_tokens": None, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers).json()
    assert r["usage"]["completion_tokens"] == 16  # OpenAI's default for completions
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": None,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers).json()
    assert r["usage"]["completion_tokens"] == 5
    body = {"prompt": "Once", "max_tokens": 3, "n": 2, "seed": 2**64 - 1}  # choice 1's seed wraps to 0
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_tokenize_and_detokenize(server, llm, offline):
    """vLLM's /tokenize and /detokenize: the count is what a completion's usage reports for the same prompt (or
    messages), and the ids decode back to the text."""
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path, body):
        return httpx.post(server.url + path, json=body, headers=headers)

    text, messages = "Once upon a time, a cat", [{"role": "user", "content": "Hello there"}]
    tokens = post("/tokenize", {"prompt": text}).json()
    used = post("/v1/completions", {"prompt": text, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert tokens["count"] == len(tokens["tokens"]) == used and tokens["max_model_len"] == llm.max_model_len
    assert post("/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"].strip() == text
    chat = post("/tokenize", {"messages": messages}).json()
    used = post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert chat["count"] == used
    for path, body, param in [
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/detokenize", {"tokens": "12"}, "tokens"),
        ("/detokenize", {"tokens": [1, True]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ]:
        r = post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert serves_the_next_request(server, offline)


def test_echo_returns_the_prompt_and_scores_it(server, offline, llm):
    """Completions' echo: the prompt's text before the completion's; with logprobs, the prompt tokens' logprobs (the
    engine's prompt_logprobs; the first is null) before the completion's; max_tokens 0 scores the prompt alone, as
    evaluation harnesses ask (echo, logprobs, max_tokens 0)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    prompt = "Once upon a time"
    body = {"prompt": prompt, "echo": True, "max_tokens": 4, "temperature": 0, "logprobs": 1}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers).json()
    choice = r["choices"][0]
    assert choice["text"] == prompt + offline(prompt, 4)
    from nanovllm import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=4, logprobs=1, prompt_logprobs=1)
    want = offline.engine.generate([prompt], greedy, use_tqdm=False)[0]
    lp = choice["logprobs"]
    n_prompt = r["usage"]["prompt_tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n_prompt] == [e["logprob"] for e in want["prompt_logprobs"][1:]]
    assert lp["token_logprobs"][n_prompt:] == [e["logprob"] for e in want["logprobs"]]
    assert len(lp["tokens"]) == n_prompt + 4 and all(len(t) <= 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][n_prompt] == len(prompt)
    scored = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 0}, headers=headers).json()
    assert scored["choices"][0]["text"] == prompt and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n_prompt]
    for bad, param in (({"stream": True}, "echo"), ({"echo": "yes"}, "echo"), ({"echo": False, "max_tokens": 0},
                       "max_tokens")):  # fmt: skip
        reply = httpx.post(server.url + "/v1/completions", json={**body, **bad}, headers=headers)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert serves_the_next_request(server, offline)


def test_a_prompt_longer_than_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[1] * 5000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_the_api_key_is_required(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


# ---- load, disconnects -----------------------------------------------------------------------------------


def test_load_200_streams_with_disconnects(server, llm, offline):
    """200 concurrent streams (some n=2, some with stop strings), about 10% of clients leave mid-stream: every other
    stream gets the offline answer, and the engine ends idle with every block free. Bounded: 200 clients, 120 s."""
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 40))] for _ in range(200)]
    leave = set(rng.sample(range(200), 20))
    headers = {"Authorization": f"Bearer {KEY}"}

    async def one(i, http):
        body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0, "stream": True, "n": 2 if i % 7 == 0 else 1}
        if i % 5 == 0:
            body["stop"] = ["e"]
        texts: dict[int, str] = {}
        async with http.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if i in leave and len(texts) >= 1:
                    return None  # the client goes away mid-stream
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        return texts, body

    async def main():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(i, http) for i in range(200))), timeout=120)

    gc.disable()  # a task the server left waiting would otherwise vanish at a collection, with only a warning
    try:
        results = asyncio.run(main())
        deadline = time.time() + 10  # a stream the client left stops its tasks once that is noticed, not at GC
        while (pending := server.pending_stream_tasks()) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        gc.enable()
    assert pending == []
    for i, result in enumerate(results):
        if result is None:
            continue
        texts, body = result
        want = offline(prompts[i], 12, stop=body.get("stop", []))
        assert [texts.get(k, "") for k in range(body["n"])] == [want] * body["n"], i
    deadline = time.time() + 10
    while not idle(llm):  # the last disconnects are noticed within a step or two
        assert time.time() < deadline, "requests of clients that left were not released"
        time.sleep(0.05)
    assert not llm.requests


# ---- nanovllm chat ---------------------------------------------------------------------------------------


def chat_args(**more):
    options = dict(model=MODEL, url=None, api_key=None, max_tokens=8, temperature=0.0, seed=None, dtype=None)
    options |= dict(device="cpu", max_num_seqs=8, max_model_len=None, kv_cache_memory=None, quantization=None)
    options |= dict(tensor_parallel_size=1, kv_cache_dtype="auto")
    return SimpleNamespace(**{**options, **more})


def test_chat_in_the_terminal_keeps_the_conversation_and_resets(offline):
    from nanovllm.chat import run_chat

    out = io.StringIO()
    assert run_chat(chat_args(), io.StringIO("Hello\nAgain\n/reset\nHello\n"), out) == 0
    lines = out.getvalue().splitlines()
    answers = [line[2:] for line in lines if line.startswith("> ") and len(line) > 2 and "new conversation" not in line]
    first = offline("user: Hello\nassistant:", 8)
    assert answers[0] == first and answers[2] == first  # after /reset, the same first turn
    second = offline(f"user: Hello\nassistant: {first}\nuser: Again\nassistant:", 8)
    assert answers[1] == second and "(a new conversation)" in out.getvalue()


def test_chat_against_a_running_server(server, offline):
    from nanovllm.chat import run_chat

    out = io.StringIO()
    assert run_chat(chat_args(url=server.url, api_key=KEY), io.StringIO("Hello\n"), out) == 0
    assert offline("user: Hello\nassistant:", 8) in out.getvalue()


# ---- logprobs and best_of --------------------------------------------------------------------------------


def test_greedy_logprobs_equal_the_offline_engines(client, offline):
    """The server's logprobs, in both OpenAI shapes, are the offline engine's output()["logprobs"]; token strings
    are each id decoded alone."""
    from nanovllm import SamplingParams

    def want(prompt, k):
        params = SamplingParams(temperature=0, max_tokens=8, logprobs=k)
        return offline.engine.generate([prompt], params, use_tqdm=False)[0]

    decode = offline.engine.tokenizer.decode
    w = want("Once upon a time", 3)
    r = client.completions.create(
        model="tiny-llama", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in w["logprobs"]], abs=1e-5)
    assert lp.tokens == [decode([t]) for t in w["token_ids"]]
    assert [list(d) for d in lp.top_logprobs] == [
        list(dict.fromkeys(decode([t]) for t, _ in e["top"])) for e in w["logprobs"]
    ]
    assert all(1 <= len(d) <= 3 for d in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(r.choices[0].text)
    w = want("user: Hello there\nassistant:", 2)
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in w["logprobs"]], abs=1e-5)
    assert [[a.token for a in c.top_logprobs] for c in content] == [
        [decode([t]) for t, _ in e["top"]] for e in w["logprobs"]
    ]
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    r = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=4, temperature=0, logprobs=0)
    assert r.choices[0].logprobs.top_logprobs == [{}] * 4 and len(r.choices[0].logprobs.token_logprobs) == 4


def test_streamed_logprobs_add_up_to_the_non_streamed_ones(client):
    """Chunk by chunk, the same lists. The second run of a prompt finds its blocks in the prefix cache, and a prompt
    computed in other steps may differ in the last bits: floats are compared to 1e-5."""
    options = dict(model="tiny-llama", prompt="The cat sat", max_tokens=12, temperature=0, logprobs=2, n=2)
    whole = client.completions.create(**options).choices
    chunks = [c for chunk in client.completions.create(**options, stream=True) for c in chunk.choices]
    for i in range(2):
        mine, want = [c.logprobs for c in chunks if c.index == i and c.logprobs], whole[i].logprobs
        fields = ("tokens", "text_offset", "token_logprobs", "top_logprobs")
        joined = {f: [x for lp in mine for x in getattr(lp, f)] for f in fields}
        assert joined["tokens"] == want.tokens and joined["text_offset"] == want.text_offset
        assert joined["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-5)
        assert [list(d) for d in joined["top_logprobs"]] == [list(d) for d in want.top_logprobs]
    options = dict(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0,
                   logprobs=True, top_logprobs=3)  # fmt: skip
    whole = client.chat.completions.create(**options).choices[0].logprobs.content
    chunks = client.chat.completions.create(**options, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in streamed] == [
        (t.token, [a.token for a in t.top_logprobs]) for t in whole
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-5)


def test_best_of_runs_the_engines_candidates(server, client, offline, llm):
    """best_of > n: the engine's own candidates (one prefill), the n most likely back, as offline; every candidate's
    tokens in usage; bad logprobs settings are 400s naming the parameter."""
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=8, n=2, best_of=4, seed=5, logprobs=0)
    want = offline.engine.generate(["Once"], params, use_tqdm=False)[0]["outputs"]
    r = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=8, temperature=1.0, n=2, best_of=4,
                                  seed=5, logprobs=0)  # fmt: skip
    assert [c.text for c in r.choices] == [w["text"] for w in want] and [c.index for c in r.choices] == [0, 1]
    assert sum(r.choices[0].logprobs.token_logprobs) >= sum(r.choices[1].logprobs.token_logprobs)  # best first
    assert r.usage.completion_tokens >= sum(len(w["token_ids"]) for w in want)
    assert idle(llm) and not llm.requests and not server.app.state.engine.owners
    for bad, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                       ({"logprobs": 3}, "logprobs"), ({"best_of": 2}, "best_of")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], extra_body=bad
            )
        assert e.value.param == param


# ---- logit_bias, allowed_token_ids, prompt_logprobs ---------------------------------------------------------


def test_logit_bias_and_allowed_token_ids_are_the_offline_engines(client, offline):
    """OpenAI's logit_bias (token ids as string keys) and vLLM's allowed_token_ids extra: the offline answers."""
    from nanovllm import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=1)
    first = offline.engine.generate(["Once"], greedy, use_tqdm=False)[0]["token_ids"][0]
    want = offline("Once", 6, logit_bias={first: -100.0})
    assert want != offline("Once", 6)  # the bias changes the answer: the test can tell
    r = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=6, temperature=0,
                                  logit_bias={str(first): -100})  # fmt: skip
    assert r.choices[0].text == want
    messages = [{"role": "user", "content": "Hi"}]
    chat_first = offline.engine.generate(["user: Hi\nassistant:"], greedy, use_tqdm=False)[0]
    bias = {chat_first["token_ids"][0]: -100.0}
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0,
                                       logit_bias={str(t): b for t, b in bias.items()})  # fmt: skip
    assert r.choices[0].message.content == offline("user: Hi\nassistant:", 6, logit_bias=bias)
    allowed = [first, 300, 301, 302]
    r = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=6, temperature=0,
                                  extra_body={"allowed_token_ids": allowed})  # fmt: skip
    assert r.choices[0].text == offline("Once", 6, allowed_token_ids=allowed) != offline("Once", 6)


def test_prompt_logprobs_in_vllms_shape(server, offline, llm):
    from nanovllm import SamplingParams

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    want = offline.engine.generate(["Once upon a time"], params, use_tqdm=False)[0]
    ids = offline.engine.tokenizer.encode("Once upon a time")
    assert got[0] is None and len(got) == len(ids) == len(want["prompt_logprobs"])
    for token, mine, theirs in zip(ids[1:], got[1:], want["prompt_logprobs"][1:]):
        assert list(mine)[0] == str(token) and mine[str(token)]["logprob"] == pytest.approx(theirs["logprob"], abs=1e-5)
        assert all(mine[str(t)]["logprob"] == pytest.approx(lp, abs=1e-5) for t, lp in theirs["top"])
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=headers)
    assert r.status_code == 200 and r.json()["prompt_logprobs"][0] is None and len(r.json()["prompt_logprobs"]) > 1
    assert idle(llm)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),  # outside the vocabulary: found at submission
        ({"logit_bias": [5]}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [100000]}, "allowed_token_ids"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_bad_bias_allowed_and_prompt_logprobs_are_400s(server, llm, extra, param):
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", chat)):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 2, **extra}, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    assert idle(llm)
