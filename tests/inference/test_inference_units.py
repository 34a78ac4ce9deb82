"""The engine's parts on one process: parameters, sampling, attention with a cache, stop rules, limits."""
from __future__ import annotations

import pytest
import torch
from inference_reference import tiny_config

from lessons_pkg.inference import InferenceEngine, KVCache, SamplingParams
from lessons_pkg.inference.sampling import next_top_p, sample, top_k_filter, top_p_filter
from lessons_pkg.tensor_parallel import ParallelGPT, master_state_dict
from lessons_pkg.tensor_parallel.transformer import attention_reference

VOCAB = 300
ATOL = 1e-5   # float32, the same weights: cached vs full forward differ only in summation order (~1e-7)


class CharTokenizer:
    """One id per character (ids < 300): enough for the engine's text helpers, with no training."""
    eod = 0
    encoder = None
    vocab_size = VOCAB

    def tokenize(self, text):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def model():
    config = tiny_config(VOCAB)
    m = ParallelGPT(config)
    m.load_master_state_dict(master_state_dict(config, seed=5))
    return m.eval()


@pytest.fixture
def engine(model):
    return InferenceEngine(model, CharTokenizer())


# -- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, words", [
    (dict(tokens_to_generate=-1), ["tokens_to_generate", "-1"]),
    (dict(tokens_to_generate=0), ["tokens_to_generate=0", "logprobs"]),
    (dict(temperature=0.0), ["temperature", "0.0"]),
    (dict(temperature=101.0), ["temperature", "101.0"]),
    (dict(top_k=-2), ["top_k", "-2"]),
    (dict(top_p=1.5), ["top_p", "1.5"]),
    (dict(top_k=5, top_p=0.5), ["top_k=5", "top_p=0.5"]),
    (dict(top_p_decay=0.5), ["top_p_decay", "without top_p"]),
    (dict(top_p=0.5, top_p_bound=0.7), ["top_p_bound (0.7)", "top_p (0.5)"]),
    (dict(random_seed=-5), ["random_seed", "-5"]),
    (dict(logprobs="yes"), ["logprobs", "'yes'"]),
    (dict(top_n_logprobs=3), ["top_n_logprobs (3)", "logprobs=True"]),
    (dict(top_n_logprobs=-1, logprobs=True), ["top_n_logprobs", "-1"]),
])
def test_bad_parameters_are_refused_by_name(bad, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**bad).validate()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_field_and_empty_prompt_and_position_limit():
    with pytest.raises(ValueError, match="top_q"):
        SamplingParams.from_dict({"top_q": 1})
    with pytest.raises(ValueError, match="add_BOS"):
        SamplingParams().validate(48, [3, 0])
    with pytest.raises(ValueError, match=r"prompt length \(40 tokens, prompt 1\) \+ tokens_to_generate \(9\) = 49 "
                                         r"exceeds the model's max_position_embeddings \(48\)"):
        SamplingParams(tokens_to_generate=9).validate(48, [3, 40])
    SamplingParams(tokens_to_generate=8).validate(48, [3, 40])             # exactly fits


def test_engine_refuses_what_does_not_fit(engine):
    # what a server checks on its serving rank before any collective: the same checks as generate
    assert engine.validate_request(["ab"], SamplingParams(tokens_to_generate=4)) == [[97, 98]]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.validate_request(["x" * 40], SamplingParams(tokens_to_generate=9, top_k=1))
    with pytest.raises(ValueError, match="beam_width"):
        engine.validate_beam_request(["ab"], 4, beam_width=0)
    with pytest.raises(ValueError, match="exactly one prompt"):
        engine.validate_beam_request(["ab", "c"], 4, beam_width=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate(["x" * 40], SamplingParams(tokens_to_generate=9, top_k=1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.beam_search(["x" * 40], 9, beam_width=2)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 300\): \[300\]"):
        engine.generate_ids([[1, 300]], SamplingParams(tokens_to_generate=4, top_k=1))
    with pytest.raises(ValueError, match="top_k"):
        engine.generate_ids([[1]], SamplingParams(tokens_to_generate=4, top_k=300))
    with pytest.raises(ValueError, match=r"top_n_logprobs \(301\) exceeds the vocabulary \(300\)"):
        engine.generate_ids([[1]], SamplingParams(tokens_to_generate=4, logprobs=True, top_n_logprobs=301))
    with pytest.raises(ValueError, match="strings or token-id lists"):
        engine.generate([3], SamplingParams(tokens_to_generate=4))
    cache = KVCache(1, 1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="holds 4 positions; 0 are filled and 5 more do not fit"):
        cache.layer(0).append(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))


# -- sampling --------------------------------------------------------------------------------
def test_top_k_and_top_p_filters_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 3.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, False, False, False, True]]
    probs = logits.softmax(-1)[0]                                        # 3.0, 2.0, 1.0, 0.5, -1.0 in order
    order = probs.argsort(descending=True).tolist()
    for top_p in (0.05, 0.5, 0.8, 0.95, 1.0):
        kept, mass = set(), 0.0                                          # the definition, by hand
        for i in order:
            kept.add(i)
            mass += float(probs[i])
            if mass > top_p:
                break
        got = {i for i, ok in enumerate(torch.isfinite(top_p_filter(logits, top_p))[0].tolist()) if ok}
        assert got == kept, (top_p, got, kept)


def test_sampling_draws_from_the_distribution_and_repeats_with_a_seed():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(20000, 1)
    draws = sample(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    # 20000 draws: the standard error of each frequency is <= 0.0035; 0.015 is > 4 of them
    assert (freq - torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)).abs().max() < 0.015
    again = sample(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    top2 = sample(logits, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(top2.tolist()) == {2, 3}
    assert torch.equal(sample(logits[:3], top_k=1), torch.tensor([3, 3, 3]))
    with pytest.raises(FloatingPointError):
        sample(torch.tensor([[0.0, float("nan")]]))
    assert next_top_p(0.9, 0.5, 0.3) == 0.45 and next_top_p(0.45, 0.5, 0.3) == 0.3 and next_top_p(0.9, 0.0, 0.0) == 0.9


# -- attention with a cache ------------------------------------------------------------------
@pytest.mark.parametrize("sq, sk", [(6, 6), (1, 6), (3, 7)])
def test_sdpa_attention_equals_the_reference(sq, sk, model):
    attention = model.layers[0].self_attention
    g = torch.Generator().manual_seed(sq * 10 + sk)
    q, k, v = (torch.randn(2, 4, s, 8, generator=g) for s in (sq, sk, sk))
    torch.testing.assert_close(attention.core_attention(q, k, v), attention_reference(q, k, v), atol=ATOL, rtol=0)


def test_cached_decoding_equals_recomputing_the_whole_sequence(model):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)                                                # [2, 12, V/tp], no cache
        cache = KVCache.for_model(model, batch_size=2, max_length=12)
        pieces = [model(ids[:, :5], kv_cache=cache), model(ids[:, 5:8], kv_cache=cache)]   # prompt, a chunk
        pieces += [model(ids[:, j: j + 1], kv_cache=cache) for j in range(8, 12)]         # one token each
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_engine_log_probs_equal_scoring_the_output(engine, model):
    """Cached generation's log-probs = a full forward over the generated sequences (scoring only)."""
    prompts = [[5, 17, 33, 2, 9], [100], [250, 251, 252, 3]]
    out = engine.generate_ids(prompts, SamplingParams(tokens_to_generate=10, top_k=1, logprobs=True))
    scored = engine.generate_ids(out.tokens, SamplingParams(tokens_to_generate=0, logprobs=True))
    for i, tokens in enumerate(out.tokens):
        assert len(tokens) == len(prompts[i]) + 10 or tokens[-1] == 0
        torch.testing.assert_close(torch.tensor(out.logprobs[i]), torch.tensor(scored.logprobs[i]), atol=ATOL, rtol=0)
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))[0, :, :VOCAB]
        greedy = logits.argmax(-1)[len(prompts[i]) - 1: -1].tolist()
        assert tokens[len(prompts[i]):] == greedy


def test_top_n_logprobs_and_step_log_probs(engine, model):
    """Top-k log-probs = log_softmax + topk of a full forward; the chosen token's value is bit for bit its
    log-prob; the callback's per-step log-probs add up to the final ones; token-id prompts = text prompts."""
    k = 4
    prompts = [[5, 17, 33, 2, 9], [100], [250, 251, 252, 3]]
    steps = []
    params = SamplingParams(tokens_to_generate=6, top_k=1, logprobs=True, top_n_logprobs=k)
    out = engine.generate_ids(prompts, params, lambda step, new, lp: steps.append(lp))
    scored = engine.generate_ids(out.tokens, SamplingParams(tokens_to_generate=0, logprobs=True, top_n_logprobs=k))
    for i, tokens in enumerate(out.tokens):
        with torch.no_grad():
            ref = model(torch.tensor([tokens]))[0, :-1, :VOCAB].double().log_softmax(-1)      # [n - 1, V]
        ref_values, ref_ids = ref.topk(k, dim=-1)
        for top in (out.top_n_logprobs[i], scored.top_n_logprobs[i]):
            assert len(top) == len(tokens) - 1
            assert [[t for t, _ in position] for position in top] == ref_ids.tolist()
            torch.testing.assert_close(torch.tensor([[v for _, v in p] for p in top], dtype=torch.float64),
                                       ref_values, atol=ATOL, rtol=0)
        # greedy: the chosen token is the most likely one, and both computations give the same float
        for j in range(len(prompts[i]) - 1, len(tokens) - 1):
            assert out.top_n_logprobs[i][j][0] == (tokens[j + 1], out.logprobs[i][j])
    # the steps cover columns 0.. in order: the prompt columns first, then one column per step
    widths = [len(s.values[0]) for s in steps]
    assert [s.start for s in steps] == [sum(widths[:j]) for j in range(len(steps))] and set(widths[1:]) == {1}
    for i, tokens in enumerate(out.tokens):
        values = [v for s in steps for v in s.values[i]][: len(tokens) - 1]
        top = [t for s in steps for t in s.top[i]][: len(tokens) - 1]
        assert values == out.logprobs[i] and top == out.top_n_logprobs[i]
    # a prompt of token ids is the same prompt as its text
    as_text = engine.generate(["ab", [97, 98]], SamplingParams(tokens_to_generate=3, top_k=1))
    assert as_text["tokens"][0] == as_text["tokens"][1] and as_text["text"][0] == as_text["text"][1]


# -- stop rules ------------------------------------------------------------------------------
def _run(engine, prompt, n=12, **kw):
    """Seeded top-k sampling: the same draws whatever stops (one uniform per step), so stops cut the base run."""
    kw = dict(dict(top_k=3, random_seed=2), **kw)
    return engine.generate([prompt], SamplingParams(tokens_to_generate=n, **kw))["tokens"][0]


def test_stop_rules(engine, model):
    prompt = "Hi: there"
    base = _run(engine, prompt, use_eod_token_for_early_termination=False)
    p = len(prompt)
    generated = base[p:]
    assert len(generated) == 12 and 0 not in generated                  # the stops below are the only ones
    target = generated[5]
    first = generated.index(target)                                       # its first occurrence
    repeat = next(j for j in range(1, len(generated)) if generated[j] == generated[j - 1])
    assert first != repeat and first > 0                                  # the cases below are distinct
    text = engine.text
    # end of document: stop right after it (the token is kept, as Megatron does)
    eod_engine = InferenceEngine(model, CharTokenizer(), eod=target)
    assert _run(eod_engine, prompt) == base[: p + first + 1]
    assert _run(eod_engine, prompt, use_eod_token_for_early_termination=False) == base
    saved = text.eol, text.double_eol, text.colon
    try:
        text.eol, text.double_eol = target, None                          # end of line
        assert _run(engine, prompt, stop_on_eol=True) == base[: p + first + 1]
        assert _run(engine, prompt, stop_on_double_eol=True) == base      # one eol is not two
        text.eol, text.double_eol = -1, target                            # the double-eol token
        assert _run(engine, prompt, stop_on_double_eol=True) == base[: p + first + 1]
        text.eol, text.double_eol = generated[repeat], None               # eol right after eol
        assert _run(engine, prompt, stop_on_double_eol=True) == base[: p + repeat + 1]
        # no newline after a colon (greedy): the pair (colon, eol) never appears, the runner-up replaces eol
        greedy = _run(engine, prompt, top_k=1, use_eod_token_for_early_termination=False)
        text.colon, text.eol = greedy[p + 2], greedy[p + 3]
        j = next(j for j in range(p, len(greedy)) if (greedy[j - 1], greedy[j]) == (text.colon, text.eol))
        constrained = _run(engine, prompt, top_k=1, prevent_newline_after_colon=True)
        assert all((constrained[i - 1], constrained[i]) != (text.colon, text.eol) for i in range(p, len(constrained)))
        with torch.no_grad():
            logits = model(torch.tensor([constrained[:j]]))[0, -1, :VOCAB]
        logits[text.eol] = float("-inf")
        assert constrained[:j] == greedy[:j] and constrained[j] == int(logits.argmax())
    finally:
        text.eol, text.double_eol, text.colon = saved


def test_add_bos_and_segments(engine):
    out = engine.generate(["ab"], SamplingParams(tokens_to_generate=2, top_k=1, add_BOS=True))
    assert out["tokens"][0][:3] == [0, ord("a"), ord("b")]
    assert out["segments"][0] == [chr(t) for t in out["tokens"][0]]
    assert out["logprobs"] is None


# -- beam search -----------------------------------------------------------------------------
@pytest.mark.parametrize("length_penalty", [1.0, 2.0, 0.5])
def test_beam_search_with_stop_tokens_matches_the_plain_reference(model, length_penalty):
    """Stop tokens among the candidates (finished hypotheses, the done rule) on the cached model."""
    from inference_reference import reference_beam_search

    from lessons_pkg.tensor_parallel.hf import to_hf_model

    hf = to_hf_model(master_state_dict(model.config, seed=5), model.config)
    prompt = [ord(c) for c in "Hi: there"]
    engine = InferenceEngine(model, CharTokenizer())
    greedy = engine.generate_ids([prompt], SamplingParams(tokens_to_generate=6, top_k=1,
                                                          use_eod_token_for_early_termination=False)).tokens[0]
    finished_any = False
    for stop in greedy[len(prompt):len(prompt) + 3]:          # tokens the beams will meet early
        hyps, scores = reference_beam_search(hf, prompt, 8, 3, length_penalty, stop)
        from lessons_pkg.inference.beam_search import beam_search

        got, got_scores = beam_search(engine, prompt, 8, 3, length_penalty, stop, False)
        assert got == hyps, (stop, got, hyps)
        torch.testing.assert_close(torch.tensor(got_scores, dtype=torch.float64),
                                   torch.tensor(scores, dtype=torch.float64), atol=1e-5, rtol=0)
        finished_any |= any(len(h) < len(prompt) + 8 for h in got)
    if length_penalty < 1.0:   # short finished hypotheses are favoured: some must be among the best
        assert finished_any, "no hypothesis ended on its stop token: the test did not exercise that branch"


def test_an_engine_seed_repeats_unseeded_requests_in_order(model):
    """``InferenceEngine(seed=)`` (the server's --seed): requests without random_seed draw their seeds from it,
    so a second engine with the same seed answers the same sequence of requests the same way; another seed,
    or none, does not (sampling over the whole vocabulary: 16 tokens of 8 prompts cannot all agree by chance)."""
    params = SamplingParams(tokens_to_generate=16, top_k=0, temperature=1.0)
    prompts = ["abc", "hello", "x", "some text", "q", "zz", "the end", "k"]

    def answers(seed):
        engine = InferenceEngine(model, CharTokenizer(), seed=seed)
        return [engine.generate(prompts, params)["tokens"], engine.generate(prompts, params)["tokens"]]

    first = answers(7)
    assert answers(7) == first
    assert first[0] != first[1]             # the stream moves on: the second request is not the first again
    assert answers(8) != first and answers(None) != first
