"""OpenAI's own client (the ``openai`` package) against our ``/v1/completions``.

Against the fake engine (tests/serving/serving_fake_engine.py, whose tokens
and log-probs are known): plain, streamed, echo, ``logprobs: k`` (whole and
streamed, joined chunks = the whole answer), ``n`` and list prompts (choice
index = prompt * n + j), token-id prompts, stop strings, ``include_usage``,
and the errors the client raises. Against the real one-rank server: the
log-probs and top alternatives equal ``transformers``' ``GPT2LMHeadModel`` on
the same weights; ``n`` samples differ yet repeat with ``seed``; ``best_of``
returns the row of highest mean log-probability.
"""
from __future__ import annotations

import openai
import pytest
from conftest import assert_logprobs_close, hf_openai_logprobs

from lessons_pkg.inference.tokenization import TokenText
from lessons_pkg.serving.completions import best_rows, mean_log_prob
from serving_fake_engine import start_fake_server


@pytest.fixture(scope="module")
def fake(tiny_tokenizer):
    url, engine, _, stop = start_fake_server(tiny_tokenizer, step_delay=0.002)
    yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30), engine
    stop()


def _joined(chunks) -> dict:
    """Streamed chunks -> per choice index: text, finish_reason, and the log-probs lists joined."""
    out = {}
    for chunk in chunks:
        for c in chunk.choices:
            d = out.setdefault(c.index, {"text": "", "finish_reason": None, "tokens": [], "token_logprobs": [],
                                         "top_logprobs": [], "text_offset": []})
            d["text"] += c.text
            d["finish_reason"] = c.finish_reason or d["finish_reason"]
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    d[key] += getattr(c.logprobs, key) or []
    return out


def _generated(engine, tokenizer, prompt, n):
    ids = tokenizer.tokenize(prompt) if isinstance(prompt, str) else prompt
    return engine.expected(prompt, n)[len(ids):]


def test_plain_list_prompts_n_and_token_prompts(fake, tiny_tokenizer):
    client, engine = fake
    r = client.completions.create(model="fake", prompt="Hello world", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == "fake" and len(r.choices) == 1
    assert r.choices[0].text == tiny_tokenizer.detokenize(_generated(engine, tiny_tokenizer, "Hello world", 6))
    assert r.choices[0].finish_reason == "length" and r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tiny_tokenizer.tokenize("Hello world")), 6)

    prompts = ["Hello world", "fox"]
    r = client.completions.create(model="fake", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:                                   # index = prompt * n + j
        assert c.text == tiny_tokenizer.detokenize(_generated(engine, tiny_tokenizer, prompts[c.index // 2], 4))
    assert r.usage.completion_tokens == 4 * 4

    ids = [tiny_tokenizer.tokenize(p) for p in prompts]
    one = client.completions.create(model="fake", prompt=ids[0], max_tokens=4, temperature=0, echo=True)
    assert one.choices[0].text == "Hello world" + r.choices[0].text         # the ids' text is echoed
    many = client.completions.create(model="fake", prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in many.choices] == [r.choices[0].text, r.choices[2].text]


def test_echo_logprobs_and_their_stream(fake, tiny_tokenizer):
    """logprobs=2 with echo: every token, the first one's log p null, the top 2 + the chosen one, offsets."""
    client, engine = fake
    segment = TokenText(tiny_tokenizer).segment
    prompt = "Hello world"
    body = dict(model="fake", prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    r = client.completions.create(**body)
    tokens = engine.expected(prompt, 5)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tiny_tokenizer.detokenize(tokens)
    assert lp.tokens == [segment(t) for t in tokens]
    assert lp.token_logprobs == [None] + [engine.log_prob(a, b) for a, b in zip(tokens, tokens[1:])]
    want_top = [None] + [dict({segment(t): v for t, v in engine.top(a, 2)}, **{segment(b): engine.log_prob(a, b)})
                         for a, b in zip(tokens, tokens[1:])]
    assert lp.top_logprobs == want_top
    assert lp.text_offset == [sum(len(segment(t)) for t in tokens[:j]) for j in range(len(tokens))]
    assert any(len(d) == 3 for d in want_top[1:]) and any(len(d) == 2 for d in want_top[1:])   # both cases seen

    # without echo: the generated tokens only, offsets still from the start of the prompt
    plain = client.completions.create(**dict(body, echo=False)).choices[0]
    n = len(tiny_tokenizer.tokenize(prompt))
    assert plain.logprobs.tokens == lp.tokens[n:] and plain.logprobs.text_offset == lp.text_offset[n:]
    assert plain.logprobs.top_logprobs == lp.top_logprobs[n:]

    # streamed: the chunks' log-probs joined are the whole answer's, with and without echo
    for echo, whole in ((True, r.choices[0]), (False, plain)):
        chunks = list(client.completions.create(**dict(body, echo=echo, stream=True)))
        assert len(chunks) > 3
        got = _joined(chunks)[0]
        assert got["text"] == whole.text and got["finish_reason"] == whole.finish_reason
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert got[key] == getattr(whole.logprobs, key), (echo, key)

    # scoring only (max_tokens=0 with echo): the prompt's log-probs, whole and streamed
    score = client.completions.create(**dict(body, max_tokens=0)).choices[0]
    assert score.text == prompt and score.logprobs.token_logprobs == lp.token_logprobs[:n]
    streamed = _joined(client.completions.create(**dict(body, max_tokens=0, stream=True)))[0]
    assert streamed["text"] == prompt and streamed["token_logprobs"] == lp.token_logprobs[:n]


def test_stop_and_include_usage(fake, tiny_tokenizer):
    client, engine = fake
    body = dict(model="fake", prompt="fox", max_tokens=10, temperature=0, logprobs=0)
    full = client.completions.create(**body).choices[0].text
    stop = full[4:6]
    assert stop and full.find(stop) >= 0
    cut = client.completions.create(**dict(body, stop=[stop, "never seen"]))
    c = cut.choices[0]
    assert c.text == full[: full.find(stop)] and c.finish_reason == "stop"
    # generation stopped at the token that completed the stop string: fewer tokens than asked, all listed
    assert cut.usage.completion_tokens == len(c.logprobs.tokens) < 10
    assert "".join(c.logprobs.tokens).startswith(c.text + stop) and c.logprobs.top_logprobs is None

    chunks = list(client.completions.create(**dict(body, stop=stop, stream=True,
                                                   stream_options={"include_usage": True})))
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage.model_dump() == cut.usage.model_dump()
    assert all(ch.usage is None for ch in text_chunks)
    got = _joined(text_chunks)[0]
    assert got["text"] == c.text and got["finish_reason"] == "stop" and got["tokens"] == c.logprobs.tokens
    # without include_usage no chunk has a usage; n=2 streams two choices
    three = client.completions.create(model="fake", prompt="fox", max_tokens=3, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="fake", prompt="fox", max_tokens=3, temperature=0, n=2, stream=True))
    assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)
    assert {i: d["text"] for i, d in _joined(chunks).items()} == {0: three, 1: three}


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(logprobs=6), "logprobs", "[0, 5]"),
    (dict(best_of=2, stream=True), "best_of", "cannot be streamed"),
    (dict(n=3, best_of=2), "best_of", "best_of (2) must be >= n (3)"),
    (dict(suffix="x"), "suffix", "does not insert"),
    (dict(prompt=[[1, 10 ** 6]]), "prompt", "outside the vocabulary"),
    (dict(stream_options={"include_usage": True}), "stream_options", "only allowed with stream=true"),
    (dict(extra_body={"top_k": 3}), "top_k", "unknown field"),
])
def test_refusals_reach_the_client_as_bad_request_errors(fake, kwargs, param, words):
    client, _ = fake
    body = dict(dict(model="fake", prompt="Hello", max_tokens=2), **kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        r = client.completions.create(**body)
        list(r) if body.get("stream") else r
    error = e.value.response.json()["error"]
    assert e.value.status_code == 400 and error["param"] == param and words in error["message"], error


def test_best_of_ranking():
    assert mean_log_prob([-9.0, -1.0, -3.0], 2) == -2.0           # the generated tokens only (after the prompt)
    assert mean_log_prob([-1.0], 2) == 0.0                           # nothing generated
    assert best_rows([-2.0, -0.5, -1.0, -0.5], 3) == [1, 3, 2]      # best first, the earlier row wins a tie


# -- the real model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(one_rank_server):
    client = openai.OpenAI(base_url=one_rank_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    return client, client.models.list().data[0].id


def test_logprobs_and_top_logprobs_equal_transformers(real, hf_model, tiny_tokenizer):
    client, model = real
    prompt, k = "The quick brown fox jumps", 3
    body = dict(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=k, echo=True)
    r = client.completions.create(**body)
    want = hf_openai_logprobs(hf_model, tiny_tokenizer, prompt, 6, k)
    assert r.choices[0].text == "".join(want["tokens"])
    assert_logprobs_close(r.choices[0].logprobs.model_dump(), want)
    assert any(len(top) == k + 1 for top in want["top_logprobs"][1:])    # a chosen token outside the top k
    streamed = _joined(client.completions.create(**dict(body, stream=True)))[0]
    assert streamed["text"] == r.choices[0].text
    assert_logprobs_close(streamed, want)


def test_n_samples_differ_repeat_with_seed_and_best_of_picks_the_best(real):
    client, model = real
    body = dict(model=model, prompt="Hello world", max_tokens=8, temperature=1.0, seed=3, logprobs=0)
    a = client.completions.create(**dict(body, n=3))
    b = client.completions.create(**dict(body, n=3))
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]                    # seeded: the same again
    assert len(set(texts)) == 3, texts                             # each row draws its own numbers
    scores = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in a.choices
              if c.finish_reason == "length"]
    assert len(scores) == 3                                        # no end-of-document: all 8 tokens are scored
    best = client.completions.create(**dict(body, n=1, best_of=3))
    assert len(best.choices) == 1 and best.choices[0].text == texts[max(range(3), key=lambda j: scores[j])]
    assert best.usage.completion_tokens == a.usage.completion_tokens     # all best_of rows were generated
