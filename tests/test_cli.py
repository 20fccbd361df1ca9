"""The command line (`nanovllm generate`): the same text as the Python API, streamed or not, each prompt's finish
reason, several prompts apart; --help shows the defaults; bad input is one line, or the command's own usage."""

from __future__ import annotations

import pytest

from conftest import TINY_MODELS
from nanovllm import LLM, SamplingParams
from nanovllm.cli import SEPARATOR, main, print_finish

pytestmark = pytest.mark.ch04
MODEL = str(TINY_MODELS / "tiny-llama")


@pytest.fixture(scope="module")
def expected() -> list[dict]:
    return LLM(MODEL).generate(["Once upon", "The cat"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)


def test_generate_prints_each_prompt_its_continuation_and_why_it_ended(capsys, expected):
    assert main(["generate", "Once upon", "The cat", "--model", MODEL, "--temperature", "0", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    # stdout is the texts alone, a separator line between them; the finish reasons go to stderr
    assert out == f"Once upon{expected[0]['text']}\n{SEPARATOR}\nThe cat{expected[1]['text']}\n"
    reasons = [f"[{o['finish_reason']}, {len(o['token_ids'])} tokens]" for o in expected]
    assert err.splitlines()[:2] == reasons and "24 tokens in" in err


def test_stream_prints_the_same_text_piece_by_piece(capsys, expected):
    argv = ["generate", "Once upon", "--model", MODEL, "--temperature", "0", "--max-tokens", "12", "--stream"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == f"Once upon{expected[0]['text']}\n" and "12 tokens in" in err
    assert err.startswith(f"[{expected[0]['finish_reason']}, 12 tokens]\n")


def test_finish_reason_line(capsys):
    print_finish({"finish_reason": "stop", "token_ids": [7]})
    print_finish({"finish_reason": "length", "token_ids": [7, 8]})
    assert capsys.readouterr().err == "[stop, 1 token]\n[length, 2 tokens]\n"


def test_help_shows_the_defaults_and_why_the_temperature_differs_from_the_api(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["generate", "--help"])
    assert raised.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for default in ("most new tokens per prompt (default: 64)", "(default: 0.8)", "(default: 1.0)", "(default: -1)"):
        assert default in out, out
    assert SamplingParams().temperature == 1.0 and "SamplingParams defaults to 1.0" in out


def test_an_unknown_option_prints_the_generate_usage(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["generate", "a", "--bogus"])
    assert raised.value.code == 2
    out, err = capsys.readouterr()
    assert (
        err.startswith("usage: nanovllm generate ")
        and "nanovllm generate: error: unrecognized arguments: --bogus" in err
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a", "b", "--stream", "--model", "/not/loaded"], "--stream takes one prompt, got 2"),
        (["generate", "a", "--temperature", "-1"], "temperature"),
        (["generate", "a", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["generate", "a", "--model", "/no/such/folder"], "/no/such/folder"),
        (["generate", "a", "--max-model-len", "100000"], "max_model_len=100000 is longer than the model's context"),
        (["generate", "a", "--max-num-seqs", "0"], "max_num_seqs must be an integer >= 1"),
        (["generate", "a", "--kv-cache-dtype", "fp4"], "kv_cache_dtype must be"),
        (["serve", "--model", "/no/such/folder"], "/no/such/folder"),  # `serve --model M` is `serve M`
        (["chat", "--model", "/no/such/folder"], "/no/such/folder"),
        (["serve", "--port", "99999"], "--port must be from 0 to 65535, got 99999"),  # before the model loads
        (["serve", "--host", "a..b"], "--host 'a..b' is not an address"),  # refused before any DNS lookup
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", MODEL]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("nanovllm: error:") and message in err and err.count("\n") == 1


def test_quantization_int8_generates_what_the_api_does(capsys, monkeypatch):
    import nanovllm

    made = []

    class Recording(nanovllm.LLM):  # the engine the command builds, kept to look at (tiny-llama's INT8 text is fp32's)
        def __init__(self, *args, **options):
            super().__init__(*args, **options)
            made.append(self)

    params = SamplingParams(temperature=0, max_tokens=8)
    want = LLM(MODEL, quantization="int8").generate(["Once upon"], params, use_tqdm=False)[0]["text"]
    monkeypatch.setattr(nanovllm, "LLM", Recording)
    argv = ["generate", "Once upon", "--model", MODEL, "--temperature", "0", "--max-tokens", "8"]
    assert main([*argv, "--quantization", "int8"]) == 0
    out, err = capsys.readouterr()
    assert out == f"Once upon{want}\n" and "8 tokens in" in err
    assert made[0].quantization == "int8" and made[0].weight_bytes < LLM(MODEL).weight_bytes


@pytest.mark.parametrize("value", ["int3", "INT8", "int4-g16"])
def test_bad_quantization_is_one_line_naming_the_choices(capsys, value):
    assert main(["generate", "a", "--model", MODEL, "--quantization", value]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("nanovllm: error: quantization must be") and err.count("\n") == 1
    assert "int4-g128" in err and repr(value) in err


def test_generate_takes_the_engines_options(capsys):
    """--max-model-len and the KV options reach the engine: a context of 8 tokens ends the text before --max-tokens."""
    argv = ["generate", "Once upon", "--model", MODEL, "--temperature", "0", "--max-tokens", "20"]
    params = SamplingParams(temperature=0, max_tokens=20)
    want = LLM(MODEL, max_model_len=8, kv_cache_dtype="bfloat16").generate(["Once upon"], params, use_tqdm=False)[0]
    assert len(want["token_ids"]) < 20 and want["finish_reason"] == "length"
    assert main([*argv, "--max-model-len", "8", "--kv-cache-dtype", "bfloat16", "--max-num-seqs", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == f"Once upon{want['text']}\n" and f"[length, {len(want['token_ids'])} tokens]" in err


def test_serve_takes_its_model_once(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["serve", MODEL, "--model", "/another/model"])
    assert raised.value.code == 2 and "two models named" in capsys.readouterr().err


def test_chat_with_no_server_there_is_one_clear_line(capsys, monkeypatch):
    import io
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanovllm: error: no answer from the server at") and err.count("\n") == 1, err
    assert main(["chat", "--url", "127.0.0.1:8000"]) == 2  # no scheme: said before the first prompt
    assert "--url must start with http://" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_before_loading(capsys, monkeypatch):
    import socket

    import nanovllm

    def no_loading(*args, **options):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(nanovllm, "LLM", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", MODEL, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"nanovllm: error: cannot listen on 127.0.0.1:{port}: Address already in use\n", err
