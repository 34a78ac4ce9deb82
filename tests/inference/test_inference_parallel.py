"""The engine on TP x PP ranks against transformers and against itself at TP = 1.

One ``run_on_ranks`` job per layout runs every request kind (greedy with
log-probabilities and the top-k alternatives, seeded sampling, scoring, beam
search, a refused request, a cancelling callback, a failing callback followed
by a good request) and returns the results; the parent compares them with
single-process references built from the same weights. The top-k
alternatives come from the vocab-parallel logits of the tensor group (each
rank's candidates, all-gathered); rank 0's per-step copy of the log-probs
comes from the sampler (point to point when PP > 1).
"""
from __future__ import annotations

import pytest
import torch
from inference_reference import (
    LOGPROB_ATOL, PROMPTS, hf_greedy, hf_log_probs, hf_top_log_probs, reference_beam_search, tiny_model_weights,
    train_tokenizer,
)

from lessons_pkg.testing import run_on_ranks

N = 8             # tokens to generate
BEAM = 3
TOP_N = 4         # top_n_logprobs
SAMPLED = dict(tokens_to_generate=N, temperature=0.9, top_p=0.9, top_p_decay=0.95, top_p_bound=0.6, random_seed=7)
TOP_K = dict(tokens_to_generate=N, top_k=5, temperature=1.5, random_seed=11)


def run_requests(tp: int, pp: int, vocab_file: str, merge_file: str) -> dict:
    """On every rank: build this rank's stage and engine, run every kind of request, return what came back."""
    from lessons_pkg import parallel_state
    from lessons_pkg.checkpoint.pretrained import Pretrained, build_stage
    from lessons_pkg.data.tokenizer import build_tokenizer
    from lessons_pkg.inference import GenerationError, InferenceEngine, SamplingParams

    if tp * pp > 1:
        parallel_state.initialize_model_parallel(tp, pp)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    else:
        tp_group = pp_group = None
        pp_rank = 0
    tokenizer = build_tokenizer(vocab_file, merge_file)
    config, weights = tiny_model_weights(tokenizer.vocab_size)
    engine = InferenceEngine(build_stage(Pretrained(config, weights, tokenizer), tp_group, pp_rank, pp),
                             tokenizer, tp_group, pp_group)
    steps = []
    greedy = SamplingParams(tokens_to_generate=N, top_k=1, logprobs=True, top_n_logprobs=TOP_N)
    out = {"greedy": engine.generate(PROMPTS, greedy, lambda step, new, lp: steps.append(lp)),
           "sampled": engine.generate(PROMPTS, SamplingParams(**SAMPLED)),
           "top_k": engine.generate(PROMPTS, SamplingParams(**TOP_K)),
           "score": engine.generate(PROMPTS, SamplingParams(tokens_to_generate=0, logprobs=True, top_n_logprobs=TOP_N)),
           "beam": engine.beam_search(PROMPTS[:1], N, BEAM, length_penalty=1.0)}
    try:  # refused before any collective, identically on every rank
        engine.generate(PROMPTS, SamplingParams(tokens_to_generate=config.max_position_embeddings))
    except ValueError as e:
        out["too_long"] = str(e)

    out["steps"] = [(s.start, s.values, s.top) for s in steps]
    seen = []

    def cancel_second(step, new_tokens, log_probs):   # a client of prompt 1 goes away after its 3rd token
        seen.append(new_tokens)
        return {1} if sum(t is not None for t in (s[1] for s in seen)) == 3 else None

    out["cancelled"] = engine.generate(PROMPTS, SamplingParams(tokens_to_generate=N, top_k=1), cancel_second)
    out["seen"] = seen

    def failing(step, new_tokens, log_probs):
        if step == 2:
            raise RuntimeError("client callback broke")

    try:
        engine.generate(PROMPTS, SamplingParams(tokens_to_generate=N, top_k=1), failing)
    except GenerationError as e:
        out["failed"] = str(e)
    out["after_failure"] = engine.generate(PROMPTS[:1], SamplingParams(tokens_to_generate=N, top_k=1))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lessons_pkg.data.tokenizer import build_tokenizer
    from lessons_pkg.tensor_parallel.hf import to_hf_model

    vocab_file, merge_file = train_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    tokenizer = build_tokenizer(vocab_file, merge_file)
    config, weights = tiny_model_weights(tokenizer.vocab_size)
    hf = to_hf_model(weights, config)
    prompt_ids = [tokenizer.tokenize(p) for p in PROMPTS]
    greedy = [hf_greedy(hf, p, N, tokenizer.eod) for p in prompt_ids]
    reference = dict(prompt_ids=prompt_ids, greedy=greedy, greedy_log_probs=[hf_log_probs(hf, t) for t in greedy],
                     prompt_log_probs=[hf_log_probs(hf, p) for p in prompt_ids],
                     greedy_top=[hf_top_log_probs(hf, t, TOP_N) for t in greedy],
                     prompt_top=[hf_top_log_probs(hf, p, TOP_N) for p in prompt_ids],
                     beam=reference_beam_search(hf, prompt_ids[0], N, BEAM, 1.0, tokenizer.eod))
    serial = run_requests(1, 1, vocab_file, merge_file)          # TP = PP = 1, in this process
    return dict(files=(vocab_file, merge_file), tokenizer=tokenizer, reference=reference, serial=serial)


def test_single_process_matches_transformers(setup):
    check_against_references(setup["serial"], setup, rank=0)


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (2, 2)])
def test_parallel_matches_single_process_and_transformers(setup, tp, pp):
    results = run_on_ranks(run_requests, world_size=tp * pp, args=(tp, pp, *setup["files"]), timeout=120)
    for rank, out in enumerate(results):
        check_against_references(out, setup, rank)
        for kind in ("sampled", "top_k"):      # the same seed, the same tokens at every layout
            assert out[kind]["tokens"] == setup["serial"][kind]["tokens"], f"rank {rank}: {kind} differs from TP=1"
        assert out["beam"]["text"] == setup["serial"]["beam"]["text"], f"rank {rank}"


def check_against_references(out: dict, setup: dict, rank: int) -> None:
    tokenizer, eod, ref = setup["tokenizer"], setup["tokenizer"].eod, setup["reference"]
    prompt_ids = ref["prompt_ids"]
    greedy = out["greedy"]
    for i, prompt in enumerate(prompt_ids):
        tokens = greedy["tokens"][i]
        assert tokens == ref["greedy"][i], f"greedy tokens of prompt {i} differ from transformers"
        assert greedy["text"][i] == tokenizer.detokenize(tokens)
        assert "".join(greedy["segments"][i]) == greedy["text"][i]
        assert len(greedy["logprobs"][i]) == len(tokens) - 1
        torch.testing.assert_close(torch.tensor(greedy["logprobs"][i], dtype=torch.float64),
                                   ref["greedy_log_probs"][i], atol=LOGPROB_ATOL, rtol=0)
        scored = torch.tensor(out["score"]["logprobs"][i], dtype=torch.float64)   # scoring only: the prompt
        torch.testing.assert_close(scored, ref["prompt_log_probs"][i], atol=LOGPROB_ATOL, rtol=0)
        assert out["score"]["tokens"][i] == prompt
        for top, (ref_values, ref_ids) in ((greedy["top_n_logprobs"][i], ref["greedy_top"][i]),
                                           (out["score"]["top_n_logprobs"][i], ref["prompt_top"][i])):
            assert [[t for t, _ in p] for p in top] == ref_ids.tolist(), f"rank {rank}: top-{TOP_N} ids of prompt {i}"
            values = torch.tensor([[v for _, v in p] for p in top], dtype=torch.float64).view(-1, TOP_N)
            torch.testing.assert_close(values, ref_values, atol=LOGPROB_ATOL, rtol=0)
        for j in range(len(prompt) - 1, len(tokens) - 1):   # greedy: the chosen token heads the top k, same float
            assert greedy["top_n_logprobs"][i][j][0] == (tokens[j + 1], greedy["logprobs"][i][j])
        if rank == 0:                       # rank 0's per-step copy (the sampler's, sent when PP > 1) = the result
            n = len(tokens) - 1
            assert [v for _, values, _ in out["steps"] for v in values[i]][:n] == greedy["logprobs"][i]
            assert [t for _, _, top in out["steps"] for t in top[i]][:n] == greedy["top_n_logprobs"][i]
    for kind in ("sampled", "top_k"):
        for i, prompt in enumerate(prompt_ids):
            tokens = out[kind]["tokens"][i]
            assert tokens[: len(prompt)] == prompt
            assert len(tokens) == len(prompt) + N or tokens[-1] == eod

    hyps, scores = ref["beam"]
    assert out["beam"]["text"] == [tokenizer.detokenize(h) for h in hyps]
    torch.testing.assert_close(torch.tensor(out["beam"]["scores"], dtype=torch.float64),
                               torch.tensor(scores, dtype=torch.float64), atol=LOGPROB_ATOL, rtol=0)

    assert "max_position_embeddings (48)" in out["too_long"] and "exceeds" in out["too_long"]

    # cancelling prompt 1 after its 3rd token: its answer stops there, the others are untouched
    cancelled, seen = out["cancelled"]["tokens"], out["seen"]
    assert cancelled[0] == greedy["tokens"][0] and cancelled[2] == greedy["tokens"][2]
    assert cancelled[1] == greedy["tokens"][1][: len(prompt_ids[1]) + 3]
    if rank != 0:                           # the callback runs on the model's rank 0 only
        assert seen == []
    else:
        streamed = [[s[i] for s in seen if s[i] is not None] for i in range(len(PROMPTS))]
        for i in (0, 2):
            assert streamed[i] == greedy["tokens"][i][len(prompt_ids[i]):], f"streamed tokens of prompt {i}"
        assert streamed[1] == cancelled[1][len(prompt_ids[1]):]

    assert "client callback broke" in out["failed"] or "failed on rank 0" in out["failed"]
    assert out["after_failure"]["tokens"][0] == greedy["tokens"][0]
