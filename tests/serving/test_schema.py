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


def test_openai_rows_token_prompts_and_accepted_fields(tiny_tokenizer):
    """n / best_of rows side by side; token-id prompts; null and documented no-op fields accepted."""
    ids = tiny_tokenizer.tokenize("Hello world")
    c = parse_completion_request({"prompt": ["a", "Hello world"], "n": 2, "best_of": 3, "logprobs": 2, "user": "u",
                                  "suffix": "", "logit_bias": {}, "presence_penalty": 0, "max_tokens": None,
                                  "stop": None, "seed": None, "temperature": None}, tiny_tokenizer, MAXPOS, "m")
    assert c.request.prompts == ["a"] * 3 + ["Hello world"] * 3 and (c.n, c.best_of) == (2, 3)
    assert list(c.rows(1)) == [3, 4, 5] and c.request.prompt_lengths[3:] == [len(ids)] * 3
    assert c.request.sampling["top_n_logprobs"] == 2 and c.request.sampling["logprobs"] and c.logprobs == 2
    assert c.request.sampling["tokens_to_generate"] == 16 and c.request.sampling["temperature"] == 1.0
    c = parse_completion_request({"prompt": ids}, tiny_tokenizer, MAXPOS, "m")
    assert c.request.prompts == [ids] and c.prompt_texts == ["Hello world"] and c.prompt_ids == [ids]
    c = parse_completion_request({"prompt": [ids, ids[:1]], "best_of": 2, "echo": True, "max_tokens": 0},
                                 tiny_tokenizer, MAXPOS, "m")
    assert c.request.prompts == [ids, ids, ids[:1], ids[:1]] and c.request.sampling["logprobs"]   # best_of ranks
    c = parse_completion_request({"prompt": "", "stream": True, "stream_options": {"include_usage": True}},
                                 tiny_tokenizer, MAXPOS, "m")
    assert c.include_usage and c.request.prompts == [[tiny_tokenizer.eod]] and c.prompt_texts == [""]
    assert not parse_completion_request({"prompt": "a"}, tiny_tokenizer, MAXPOS, "m").request.sampling["logprobs"]


@pytest.mark.parametrize("body, word", [
    ({"max_tokens": 1}, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, "gpt-4"),
    ({"prompt": "a", "n": 0}, "n must be an integer >= 1, got 0"),
    ({"prompt": "a", "n": 3, "best_of": 2}, "best_of (2) must be >= n (3)"),
    ({"prompt": "a", "best_of": 2, "stream": True}, "best_of=2 cannot be streamed"),
    ({"prompt": ["a"] * 65, "n": 2}, "65 prompt(s) x best_of 2 = 130"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "logprobs": 6}, "logprobs must be in [0, 5] (OpenAI's maximum), got 6"),
    ({"prompt": "a", "logprobs": True}, "logprobs must be an integer, got true"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "max_tokens": 100}, "positions"),
    ({"prompt": [[1, 2], [1, 300]]}, "prompt[1] holds token ids outside the vocabulary [0, 300): [300]"),
    ({"prompt": [1, "a"]}, "a list of token ids"),
    ({"prompt": [[1], []]}, "a list of token-id lists"),
    ({"prompt": [True]}, "a list of token ids"),
    ({"prompt": "a", "frequency_penalty": 1}, "frequency_penalty"),
    ({"prompt": "a", "suffix": "x"}, "suffix is not supported"),
    ({"prompt": "a", "logit_bias": {"5": 10}}, "logit_bias is not supported"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options is only allowed with stream=true"),
    ({"prompt": "a", "stream": True, "stream_options": {"usage": True}}, "stream_options must be an object"),
    ({"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage must be a boolean"),
    ({"prompt": "a", "user": 5}, "user must be a string"),
    ({"prompt": "a", "top_k": 5}, "unknown field(s) ['top_k']"),
])
def test_bad_completion_requests(tiny_tokenizer, body, word):
    with pytest.raises(BadRequest) as e:
        parse_completion_request(body, tiny_tokenizer, MAXPOS, "m")
    assert word in str(e.value), (word, str(e.value))
