"""Tokenizers: Hugging Face tokenizer folders, and llama2.c's score-ordered BPE (`tok*.bin`)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Protocol

from nanovllm.errors import ModelFormatError


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: list[int]
    special_ids: frozenset[int]  # tokens that decode to nothing (BOS, EOS, padding, ...)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json and friends), through transformers' AutoTokenizer."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises many types; the caller needs one
            raise ModelFormatError(f"{folder}: could not load the tokenizer ({type(e).__name__}: {e})") from e
        self.bos_token_id = self.tok.bos_token_id
        self.eos_token_ids = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        self.special_ids = frozenset(self.tok.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class Llama2cTokenizer:
    """llama2.c's tokenizer: pieces with merge scores; encoding greedily merges the best-scoring pair.

    File format: int32 max_token_length, then per token: float32 score, int32 length, bytes.
    Ids 0, 1, 2 are <unk>, <s> (BOS), </s> (EOS); ids 3..258 are the byte fallbacks <0x00>..<0xFF>.
    """

    def __init__(self, path: str | Path, vocab_size: int):
        raw = Path(path).read_bytes()
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        offset = 4  # skip max_token_length
        try:
            for _ in range(vocab_size):
                score, length = struct.unpack_from("<fi", raw, offset)
                offset += 8
                self.pieces.append(raw[offset : offset + length])
                self.scores.append(score)
                offset += length
        except struct.error as e:
            raise ModelFormatError(f"{path}: truncated llama2.c tokenizer ({e})") from e
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.bos_token_id, self.eos_token_ids = 1, [2]
        self.special_ids = frozenset({0, 1, 2})

    def encode(self, text: str) -> list[int]:
        """BOS, then (for non-empty text) a dummy-prefix space, then BPE by merge score."""
        ids = [self.bos_token_id]
        if not text:
            return ids
        tokens = [self.ids[b" "]]
        for ch in text:
            piece = ch.encode("utf-8")
            if piece in self.ids:
                tokens.append(self.ids[piece])
            else:  # byte fallback: <0xXX> sits at id byte + 3
                tokens.extend(b + 3 for b in piece)
        while True:
            best, best_score = None, float("-inf")
            for i in range(len(tokens) - 1):
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score = (i, merged), self.scores[merged]
            if best is None:
                return ids + tokens
            i, merged = best
            tokens[i : i + 2] = [merged]

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if i < 3:  # special tokens print nothing
                continue
            piece = self.pieces[i]
            if i < 259:  # raw byte token
                out.append(i - 3)
            else:
                out += piece
        text = out.decode("utf-8", errors="replace")
        # sentencepiece drops the dummy-prefix space at the start of a text
        return text[1:] if text.startswith(" ") else text


def incremental_text(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The text the output tokens add after the prompt (decoding them alone can lose a leading space)."""
    return tokenizer.decode(prompt_ids + output_ids)[len(tokenizer.decode(prompt_ids)) :]


class IncrementalDetokenizer:
    """A request's output text, grown token by token at a cost per token that does not grow with the text.

    Decoding new tokens on their own can go wrong two ways: a sentencepiece decoder drops the leading
    space of a text's first word, and a character of several bytes can span tokens. So each step decodes
    a short window twice, without and with the new tokens, and keeps what the new tokens add; while the
    text ends in an unfinished character (U+FFFD), it waits for more tokens. The result is the text
    `incremental_text` gives, without decoding the whole output again at every step. (A tokenizer that
    rewrites spaces around punctuation when decoding, `clean_up_tokenization_spaces`, may differ by such a space.)
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        # the window: the tokens of the last piece of text, then pending ones (at first: the whole prompt).
        # Special tokens print nothing: left out, so every token in the window carries at least one byte.
        self.window = [i for i in prompt_ids if i not in tokenizer.special_ids]
        self.decoded = len(self.window)  # window[:decoded] is already text; window[decoded:] is pending
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Take the next output tokens; returns the text they complete (may be empty, for now)."""
        self.window += [i for i in new_ids if i not in self.tokenizer.special_ids]
        if self.decoded == len(self.window):
            return ""
        before = self.tokenizer.decode(self.window[: self.decoded])
        after = self.tokenizer.decode(self.window)
        if not after.endswith("\ufffd"):
            return self._take(before, after, len(self.window))
        # bytes that make no text pile up: keep the window short. A character has at most 4 bytes, so the
        # text of a cut that 3 more tokens follow is settled, if the cut splits no character (nor a run of
        # bytes that together make one U+FFFD): the window's text is the two sides' texts joined.
        for end in range(len(self.window) - 3, max(self.decoded, len(self.window) - 7), -1):
            settled = self.tokenizer.decode(self.window[:end])
            if after == settled + self.tokenizer.decode(self.window[end:]):
                return self._take(before, settled, end)
        return ""  # an unfinished character: wait for its next bytes

    def flush(self) -> str:
        """At the end of the output: whatever is left, unfinished characters included (as U+FFFD)."""
        if self.decoded == len(self.window):
            return ""
        before = self.tokenizer.decode(self.window[: self.decoded])
        return self._take(before, self.tokenizer.decode(self.window), len(self.window))

    def _take(self, before: str, after: str, end: int) -> str:
        """The text of window[decoded:end] is final: after (the window up to end) less before (up to decoded)."""
        new_text = after[len(before) :]
        del self.window[: self.decoded]  # the next window starts with the tokens of this new text
        self.decoded = end - self.decoded
        self.text += new_text
        return new_text
