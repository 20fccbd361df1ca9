"""Log-probabilities in OpenAI's two shapes, from the engine's records of them.

A request that asks for logprobs (SamplingParams.logprobs = k) has, for each output token, its log-probability
under the model's distribution and the k most likely tokens with theirs: the engine keeps these as
(logprob, [(token_id, logprob), ...]) on its sequence (`token_logprobs`), and output() gives them as
[{"logprob", "top"}]. Here they become
- completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"};
- chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

Token strings are per-token text: each id decoded alone. They need not be the slice of the completion's text the
token made: a character of several bytes split over tokens decodes to U+FFFD in each piece (and "bytes" are that
text's UTF-8, not the token's raw bytes), and a tokenizer that drops a text's leading space drops it here too.
Two alternatives that decode to the same string share one key of a completions top_logprobs dict: the more likely
one is kept. text_offset is exact: where each token's text starts in the completion's text (0 = its start), from
the same incremental decoding that makes that text.

prompt_logprobs (vLLM's extra) come in vLLM's shape: None for the first prompt token, then per token a
{token id: {"logprob", "decoded_token"}} dict, the prompt token first, then its k most likely alternatives.
"""

from __future__ import annotations

from nanovllm.utils.tokenizer import IncrementalDetokenizer, Tokenizer

Record = tuple[float, list[tuple[int, float]]]  # one token's (logprob, [(alternative id, logprob), ...])


class LogprobWriter:
    """One choice's logprobs, written token by token: a stream sends each chunk's tokens through the same writer,
    so the chunks' lists add up to the non-streamed answer's."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)  # only for text_offset
        self.strings: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        """The id decoded alone (cached: the same alternatives come back token after token)."""
        text = self.strings.get(token_id)
        if text is None:
            text = self.strings[token_id] = self.tokenizer.decode([token_id])
        return text

    def write(self, token_ids: list[int], records: list[Record]) -> dict:
        """These tokens' logprobs, in the chat or the completions shape."""
        if self.chat:
            return {"content": [self._chat(t, lp, top) for t, (lp, top) in zip(token_ids, records)]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, (lp, top) in zip(token_ids, records):
            out["tokens"].append(self.token(t))
            out["token_logprobs"].append(lp)
            alternatives: dict[str, float] = {}
            for alt, alt_lp in top:  # most likely first: setdefault keeps it when two decode alike
                alternatives.setdefault(self.token(alt), alt_lp)
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(len(self.detokenizer.text))  # a token inside a character: where it starts
            self.detokenizer.add([t])
        return out

    def _chat(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        entry = self._entry(token_id, logprob)
        entry["top_logprobs"] = [self._entry(alt, alt_lp) for alt, alt_lp in top]
        return entry

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def records_of(result: dict) -> list[Record]:
    """The records in an engine result's "logprobs" (output()'s [{"logprob", "top"}])."""
    return [(e["logprob"], e["top"]) for e in result["logprobs"]]


def prompt_logprobs_of(tokenizer: Tokenizer, prompt_ids: list[int], result: dict) -> list | None:
    """An engine result's "prompt_logprobs" in vLLM's shape (None when the request did not ask for them)."""
    entries = result.get("prompt_logprobs")
    if entries is None:
        return None
    out: list = [None]
    for token, e in zip(prompt_ids[1:], entries[1:]):
        found = {str(token): {"logprob": e["logprob"], "decoded_token": tokenizer.decode([token])}}
        for alt, alt_lp in e["top"]:
            found.setdefault(str(alt), {"logprob": alt_lp, "decoded_token": tokenizer.decode([alt])})
        out.append(found)
    return out


def echo_logprobs(
    writer: LogprobWriter, prompt_ids: list[int], result: dict, completion: dict, k: int, shift: int
) -> dict:
    """Completions' logprobs with echo: the prompt's tokens first (the first has none: null, as OpenAI gives it),
    each with its k most likely alternatives, then the completion's, whose text offsets move past the echoed prompt
    (`shift` characters)."""
    entries = result["prompt_logprobs"]  # [None, {"logprob", "top"}, ...], k or more alternatives each
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    detokenizer = IncrementalDetokenizer(writer.tokenizer, [])
    for i, token in enumerate(prompt_ids):
        out["tokens"].append(writer.token(token))
        out["text_offset"].append(len(detokenizer.text))
        detokenizer.add([token])
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entries[i]["logprob"])
        alternatives: dict[str, float] = {}
        for alt, alt_lp in entries[i]["top"][:k]:  # (the engine kept as many as prompt_logprobs asked, if more)
            alternatives.setdefault(writer.token(alt), alt_lp)
        out["top_logprobs"].append(alternatives)
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        out[key] += completion[key]
    out["text_offset"] += [shift + offset for offset in completion["text_offset"]]
    return out
