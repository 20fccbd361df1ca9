"""The OpenAI API's request bodies, read into the engine's terms: prompts, SamplingParams, and errors the OpenAI way."""

from __future__ import annotations

from typing import Any

from nanovllm.sampling_params import MAX_LOGPROBS, SEED_END, SamplingParams

# OpenAI's name -> SamplingParams' name; vLLM's extras (top_k, min_p, ...) are accepted the same way
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "logit_bias": "logit_bias",  # OpenAI's keys are token ids as strings: see logit_bias()
    "allowed_token_ids": "allowed_token_ids",
    "prompt_logprobs": "prompt_logprobs",
}
# not sampling fields, but known: read elsewhere (prompt, n, logprobs, ...) or without effect here (user, suffix)
IGNORED = {"model", "stream", "stream_options", "user", "prompt", "messages", "n", "max_tokens", "return_token_ids",
           "max_completion_tokens", "logprobs", "top_logprobs", "echo", "best_of", "suffix"}  # fmt: skip
MAX_CHOICES = 16


class APIError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self):
        from fastapi.responses import JSONResponse

        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(
            404, f"the model {model!r} does not exist: this server serves {served!r}", code="model_not_found"
        )


def completion_prompts(body: dict) -> list[str | list[int]]:
    """`prompt`: a string, a list of token ids, or a list of either (one choice set per prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_list(p) for p in prompt):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of token ids, or a non-empty list of either", param="prompt")


def chat_prompt(body: dict, tokenizer) -> str | list[int]:
    """`messages` rendered by the tokenizer's chat template; without one, as plain "role: content" lines ending in
    "assistant:" (the documented fallback for models trained without a chat format, such as the default model)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    texts = [message_text(m) for m in messages]  # each message checked before it is read
    messages = [{**m, "content": text} for m, text in zip(messages, texts)]
    hf = getattr(tokenizer, "tok", None)
    if hf is not None and getattr(hf, "chat_template", None):
        try:
            rendered = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise APIError(400, f"the model's chat template rejects these messages: {e}", param="messages") from None
        return list(rendered["input_ids"])  # asked as a dict: transformers 5 returns one by default, 4 did not
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def message_text(message) -> str:
    """A message's content as one string: OpenAI's content is a string or a list of parts, of which we read the
    text ones ({"type": "text", "text": ...}, joined by newlines as vLLM does); images and audio are refused."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, "each message needs a string role and a content", param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise APIError(400, "a message's content must be a string or a non-empty list of text parts", param="messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if isinstance(kind, str) else repr(part)
            raise APIError(400, f"only text content parts are supported, got {what}", param="messages")
        texts.append(part["text"])
    return "\n".join(texts)


def sampling_params(body: dict, chat: bool) -> list[SamplingParams]:
    """One SamplingParams per choice (n of them; a seeded request's choices get seeds seed, seed + 1, ...), or with
    best_of > n, one that asks the engine for best_of candidates of which the n most likely are returned."""
    unknown = sorted(set(body) - set(SAMPLING_FIELDS) - IGNORED)
    if unknown:
        raise APIError(400, f"unknown fields {unknown}", param=unknown[0])
    echo = echo_of(body, chat)
    check_stream(body)
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}", param="n")
    best = best_of(body, n, chat)
    limit = body.get("max_tokens")  # null is the default, as if absent
    if chat and body.get("max_completion_tokens") is not None:  # chat's newer name wins
        limit = body["max_completion_tokens"]
    options: dict[str, Any] = {
        ours: body[theirs] for theirs, ours in SAMPLING_FIELDS.items() if body.get(theirs) is not None
    }
    if limit is not None:
        options["max_tokens"] = limit
    else:  # completions: OpenAI's 16; chat: as long as the context allows in OpenAI's, here a bound that keeps
        options["max_tokens"] = 256 if chat else 16  # one request from hogging the engine
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    if "logit_bias" in options:
        options["logit_bias"] = logit_bias(options["logit_bias"])
    if options.get("prompt_logprobs") is not None and body.get("stream"):
        raise APIError(400, "prompt_logprobs cannot be streamed", param="prompt_logprobs")
    options["logprobs"] = logprobs(body, chat)
    if _is_int(options["max_tokens"]) and options["max_tokens"] == 0:
        if not echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt, scored, alone)",
                           param="max_tokens")  # fmt: skip
        options["max_tokens"] = 1  # the prompt alone (prompt_only): the one token made is dropped by the server
    if echo and options["logprobs"] is not None:  # the prompt's tokens come back with theirs too
        options["prompt_logprobs"] = max(options["logprobs"], options.get("prompt_logprobs") or 0)
    seed = options.get("seed")
    try:
        if best is not None:  # the engine's own candidates, sharing the prompt's KV blocks; the n best come back
            return [SamplingParams(**options, n=n, best_of=best)]
        return [
            SamplingParams(**{**options, **({"seed": choice_seed(seed, i)} if seed is not None else {})})
            for i in range(n)
        ]
    except (ValueError, TypeError) as e:
        names = (*SAMPLING_FIELDS, "max_tokens", "min_tokens")  # the boundary's messages start with the field's name
        param = next((f for f in names if str(e).startswith(f)), next((f for f in names if f in str(e)), None))
        raise APIError(400, str(e), param=param) from None


def echo_of(body: dict, chat: bool) -> bool:
    """Completions' echo: the prompt's text before each choice's (and, with logprobs, the prompt tokens' logprobs
    before the completion's). max_tokens 0 then scores the prompt alone, as evaluation harnesses ask."""
    echo = body.get("echo")
    if echo is None or echo is False:
        return False
    if not isinstance(echo, bool):
        raise APIError(400, f"echo must be true or false, got {echo!r}", param="echo")
    if chat:
        raise APIError(400, "echo is a completions parameter", param="echo")
    if body.get("stream"):
        raise APIError(400, "echo cannot be streamed here", param="echo")
    return True


def prompt_only(body: dict) -> bool:
    """echo with max_tokens 0: the prompt, scored, and no completion."""
    return body.get("echo") is True and _is_int(body.get("max_tokens")) and body["max_tokens"] == 0


def choice_seed(seed, i: int):
    """Choice i's seed: seed + i, wrapping below 2**64 (a valid seed stays valid); a bad one is left for
    SamplingParams to name."""
    return (seed + i) % SEED_END if _is_int(seed) and 0 <= seed < SEED_END else seed


def check_stream(body: dict) -> None:
    """`stream` is a boolean; `stream_options` an object whose include_usage is a boolean (checked here: inside the
    stream, after the 200 has gone out, a bad value could only break the connection)."""
    for name in ("stream", "return_token_ids"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(400, f"{name} must be true or false, got {body[name]!r}", param=name)
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise APIError(400, f"stream_options must be an object, got {options!r}", param="stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, f"stream_options.include_usage must be true or false, got {options['include_usage']!r}",
                       param="stream_options")  # fmt: skip


def logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to return with each token's logprob (None: no logprobs). Completions: `logprobs`, an
    integer; chat: `logprobs: true`, with `top_logprobs` alternatives (0 when absent)."""
    if not chat:
        if body.get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs is a chat parameter: completions take logprobs: an integer",
                           param="top_logprobs")  # fmt: skip
        k = body.get("logprobs")
        if k is not None and not (_is_int(k) and 0 <= k <= MAX_LOGPROBS):
            raise APIError(400, f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {k!r}", param="logprobs")
        return k
    wanted, k = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError(400, f"logprobs must be true or false, got {wanted!r}", param="logprobs")
    if k is not None:
        if not (_is_int(k) and 0 <= k <= MAX_LOGPROBS):
            raise APIError(400, f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {k!r}",
                           param="top_logprobs")  # fmt: skip
        if not wanted:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (k or 0) if wanted else None


def logit_bias(value) -> dict:
    """OpenAI's logit_bias, {"token id": bias}, with integer keys (JSON keys are strings); the values and the ids'
    range are checked by SamplingParams and the engine."""
    if not isinstance(value, dict):
        raise APIError(400, f"logit_bias must be an object of token id -> bias, got {value!r}", param="logit_bias")
    bias = {}
    for key, v in value.items():
        try:
            bias[int(key)] = v
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return bias


def best_of(body: dict, n: int, chat: bool) -> int | None:
    """best_of, when it asks for more candidates than n (None otherwise: best_of == n is plain n)."""
    best = body.get("best_of")
    if best is None or best == n:
        return None
    if chat:
        raise APIError(400, "best_of is a completions parameter (chat has n only)", param="best_of")
    if not _is_int(best) or not n <= best <= MAX_CHOICES:
        raise APIError(400, f"best_of must be an integer from n ({n}) to {MAX_CHOICES}, got {best!r}", param="best_of")
    if body.get("stream"):  # which candidates come back is known only once all of them have finished
        raise APIError(400, "best_of greater than n cannot be streamed", param="best_of")
    return best


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reasons in OpenAI's words ('abort' and 'error' end the text where it stopped)."""
    return {"length": "length", "stop": "stop"}.get(reason, None if reason is None else "stop")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)
