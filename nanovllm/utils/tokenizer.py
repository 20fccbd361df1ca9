"""Tokenizers: Hugging Face tokenizer folders, and llama2.c's score-ordered BPE (`tok*.bin`)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Protocol

from nanovllm.errors import ModelFormatError


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: list[int]

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
