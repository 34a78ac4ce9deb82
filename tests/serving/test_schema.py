"""Megatron's request rules and OpenAI's mapping: every bad request is a BadRequest naming field and value."""
import pytest

from lessons_pkg.serving.schema import (SAMPLING_DEFAULTS, BadRequest, parse_api_request, parse_completion_request,
                                        parse_json)

MAXPOS = 100


def api(tok, **body):
    return parse_api_request(body, tok, MAXPOS)


def test_megatron_defaults(tiny_tokenizer):
    r = api(tiny_tokenizer, prompts=["Hello world"])
    assert r.sampling == SAMPLING_DEFAULTS
    assert r.sampling["tokens_to_generate"] == 64 and r.sampling["temperature"] == 1.0
    assert r.beam_width is None and r.stop_token == tiny_tokenizer.eod and not r.no_log
    assert r.prompt_lengths == [len(tiny_tokenizer.tokenize("Hello world"))]


@pytest.mark.parametrize("body, words", [
    ({}, ["prompts", "required"]),
    ({"prompts": "x"}, ["prompts", "list"]),
    ({"prompts": [1]}, ["prompts", "[1]"]),
    ({"prompts": []}, ["prompts", "empty"]),
    ({"prompts": ["a"] * 129}, ["129", "128"]),
    ({"prompts": [""]}, ["add_BOS"]),
    ({"prompts": ["a"], "max_len": 3}, ["max_len", "tokens_to_generate"]),
    ({"prompts": ["a"], "sentences": ["a"]}, ["sentences"]),
    ({"prompts": ["a"], "topk": 3}, ["topk"]),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, ["tokens_to_generate", '"5"']),
    ({"prompts": ["a"], "tokens_to_generate": 2.5}, ["tokens_to_generate", "2.5"]),
    ({"prompts": ["a"], "tokens_to_generate": True}, ["tokens_to_generate", "true"]),
    ({"prompts": ["a"], "tokens_to_generate": -1}, ["tokens_to_generate", "-1"]),
    ({"prompts": ["a"], "tokens_to_generate": 0}, ["tokens_to_generate=0", "logprobs"]),
    ({"prompts": ["a"], "tokens_to_generate": 100}, ["100", "positions"]),
    ({"prompts": ["a"], "logprobs": 1}, ["logprobs", "1"]),
    ({"prompts": ["a"], "temperature": 0}, ["temperature", "0"]),
    ({"prompts": ["a"], "temperature": 101}, ["temperature", "101"]),
    ({"prompts": ["a"], "top_k": 1001}, ["top_k", "1001"]),
    ({"prompts": ["a"], "top_k": -1}, ["top_k", "-1"]),
    ({"prompts": ["a"], "top_p": 1.5}, ["top_p", "1.5"]),
    ({"prompts": ["a"], "top_k": 5, "top_p": 0.5}, ["top_k (5)", "top_p (0.5)"]),
    ({"prompts": ["a"], "top_p_decay": 0.5}, ["top_p_decay", "without top_p"]),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_decay": 2.0}, ["top_p_decay", "2.0"]),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_bound": 0.7}, ["top_p_bound", "0.7"]),
    ({"prompts": ["a"], "top_p_bound": 0.1}, ["top_p_bound", "without top_p"]),
    ({"prompts": ["a"], "random_seed": -5}, ["random_seed", "-5"]),
    ({"prompts": ["a"], "add_BOS": "yes"}, ["add_BOS", '"yes"']),
    ({"prompts": ["a"], "no_log": 0}, ["no_log"]),
    ({"prompts": ["a", "b"], "beam_width": 2}, ["beam", "one prompt"]),
    ({"prompts": ["a"], "beam_width": 0}, ["beam_width", "0"]),
    ({"prompts": ["a"], "stop_token": 3}, ["stop_token", "beam_width"]),
    ({"prompts": ["a"], "beam_width": 2, "stop_token": 10 ** 6}, ["stop_token", "1000000"]),
    ({"prompts": ["a"], "beam_width": 2, "length_penalty": "x"}, ["length_penalty"]),
])
def test_bad_api_requests(tiny_tokenizer, body, words):
    with pytest.raises(BadRequest) as e:
        api(tiny_tokenizer, **body)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_good_api_combinations(tiny_tokenizer):
    r = api(tiny_tokenizer, prompts=["a", ""], add_BOS=True, tokens_to_generate=0, logprobs=True)
    assert r.prompt_lengths[1] == 1 and r.sampling["tokens_to_generate"] == 0
    r = api(tiny_tokenizer, prompts=["a"], top_p=1, top_p_decay=0.5, top_p_bound=0.25, random_seed=3)
    assert r.sampling["top_p"] == 1.0 and isinstance(r.sampling["top_p"], float)
    r = api(tiny_tokenizer, prompts=["a"], beam_width=3, length_penalty=1, stop_token=5)
    assert (r.beam_width, r.length_penalty, r.stop_token) == (3, 1.0, 5)
    assert api(tiny_tokenizer, prompts=["a"], top_k=1).greedy


@pytest.mark.parametrize("raw", [b"{", b"[1, 2", b'{"prompts": NaN}', b"\xff\xfe", b'{"a": Infinity}'])
def test_malformed_json(raw):
    with pytest.raises(BadRequest, match="JSON|UTF-8"):
        parse_json(raw)


def test_body_not_an_object(tiny_tokenizer):
    with pytest.raises(BadRequest, match="JSON object"):
        parse_api_request([1, 2], tiny_tokenizer, MAXPOS)


def test_openai_mapping(tiny_tokenizer):
    c = parse_completion_request({"prompt": "Hello", "max_tokens": 5, "temperature": 0}, tiny_tokenizer, MAXPOS, "m")
    s = c.request.sampling
    assert s["top_k"] == 1 and s["tokens_to_generate"] == 5 and not c.stream and not c.echo
    c = parse_completion_request({"prompt": ["a", "b"], "temperature": 0.7, "top_p": 1, "seed": 4, "stop": "\n",
                                  "stream": True, "echo": True}, tiny_tokenizer, MAXPOS, "m")
    s = c.request.sampling
    assert s["top_p"] == 0.0 and s["temperature"] == 0.7 and s["random_seed"] == 4 and s["tokens_to_generate"] == 16
    assert c.request.stop == ["\n"] and c.stream and c.echo and c.request.prompts == ["a", "b"]


@pytest.mark.parametrize("body, word", [
    ({"max_tokens": 1}, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, "gpt-4"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "logprobs": 5}, "logprobs=5"),
    ({"prompt": "a", "logprobs": 0, "stream": True}, "stream"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "max_tokens": 100}, "positions"),
    ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": "a", "frequency_penalty": 1}, "frequency_penalty"),
    ({"prompt": "a", "suffix": "x"}, "suffix"),
])
def test_bad_completion_requests(tiny_tokenizer, body, word):
    with pytest.raises(BadRequest, match=word.replace("[", r"\[")):
        parse_completion_request(body, tiny_tokenizer, MAXPOS, "m")
