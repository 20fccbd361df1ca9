"""The output processor: everything between a request's sampled tokens and what its caller reads.

One object per request owns its finish rules, its detokenized text, the stop-string search, the text held
back from the stream (it may be the start of a stop string) and the final text. `step()` streams from it
and `output()` reads it: there is one text path, not two that must agree.
"""

from __future__ import annotations

from nanovllm.engine.io import finish_reason, stop_string_cut
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputProcessor:
    """One request's output: call `append` for each sampled token, `finish` when the engine ends it otherwise."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, eos_ids: list[int], max_len: int
    ):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.params, self.eos_ids, self.max_len = params, eos_ids, max_len
        self.num_prompt_tokens = len(prompt_ids)
        self.finish_reason: str | None = None
        self.text_end: int | None = None  # where a stop string cut the text
        self.sent = 0  # text already streamed through take_new_text

    def append(self, output_ids: list[int]) -> str | None:
        """The newest output token is output_ids[-1]: decode it and apply the finish rules.

        Returns the finish reason ('stop' for EOS, a stop id or a stop string; 'length' for max_tokens or a full
        context) or None to go on. A stop string outranks the length limit, since the last allowed token may
        complete one; no stop rule applies before min_tokens.
        """
        p = self.params
        seq_len = self.num_prompt_tokens + len(output_ids)
        reason = finish_reason(output_ids, p, self.eos_ids, seq_len, self.max_len)
        new_text = self.detokenizer.add(output_ids[-1:])  # decodes a few tokens, not the whole output
        if reason is not None:
            new_text += self.detokenizer.flush()  # the last characters: searched for stop strings like the rest
        if p.stop and reason != "stop" and len(output_ids) >= p.min_tokens:
            text = self.detokenizer.text
            searched = len(text) - len(new_text)  # earlier tokens' text was searched when they came
            cut = stop_string_cut(text, p.stop, p.include_stop_str_in_output, searched)
            if cut is not None:
                self.text_end, reason = cut, "stop"
        if reason is not None:
            self.finish_reason = reason
        return reason

    def finish(self, reason: str) -> None:
        """The engine ended the request for another reason ('abort', 'error'): its text so far is final."""
        if self.finish_reason is None:
            self.detokenizer.flush()
            self.finish_reason = reason

    @property
    def text(self) -> str:
        """The output text so far; once finished, the final text (cut where a stop string matched)."""
        text = self.detokenizer.text
        return text if self.text_end is None else text[: self.text_end]

    def take_new_text(self) -> str:
        """The text that became final since the last call. While the request runs, text that may be the start of
        a stop string is held back: a stop string never reaches the caller unless asked for."""
        text = self.text
        end = len(text)
        if self.finish_reason is None:
            end -= max((len(s) - 1 for s in self.params.stop), default=0)
        if end <= self.sent:
            return ""
        new, self.sent = text[self.sent : end], end
        return new
