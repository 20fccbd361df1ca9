"""The command line (`nanovllm generate`): the same text as the Python API, streamed or not; bad input is one line."""

from __future__ import annotations

import pytest

from conftest import TINY_MODELS
from nanovllm import LLM, SamplingParams
from nanovllm.cli import main

pytestmark = pytest.mark.ch04
MODEL = str(TINY_MODELS / "tiny-llama")


@pytest.fixture(scope="module")
def expected() -> list[str]:
    outs = LLM(MODEL).generate(["Once upon", "The cat"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    return [o["text"] for o in outs]


def test_generate_prints_each_prompt_and_its_continuation(capsys, expected):
    assert main(["generate", "Once upon", "The cat", "--model", MODEL, "--temperature", "0", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == f"Once upon{expected[0]}\n\nThe cat{expected[1]}\n\n"
    assert "24 tokens in" in err


def test_stream_prints_the_same_text_piece_by_piece(capsys, expected):
    argv = ["generate", "Once upon", "--model", MODEL, "--temperature", "0", "--max-tokens", "12", "--stream"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == f"Once upon{expected[0]}\n\n" and "12 tokens in" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a", "b", "--stream", "--model", "/not/loaded"], "--stream takes one prompt, got 2"),
        (["generate", "a", "--temperature", "-1"], "temperature"),
        (["generate", "a", "--model", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", MODEL]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("nanovllm: error:") and message in err and err.count("\n") == 1
