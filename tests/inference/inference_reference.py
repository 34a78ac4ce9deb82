"""Shared pieces of the inference tests: a tiny tokenizer and model, and single-process references.

The references are ``transformers``' GPT-2 built from the same full-size
weights (an implementation independent of ours) and a plain beam search
written here that recomputes the whole sequence at every step (no cache, no
parallelism), following Megatron-LM's beam rules.
"""
from __future__ import annotations

import torch

from lessons_pkg.tensor_parallel import GPTConfig, master_state_dict

# float32 log-probabilities of a 300-token vocabulary (values ~ -6): the
# parallel model sums partial products in another order (per-rank partial
# sums, then all-reduces), and SDPA vs transformers' attention differ by a few
# ulps; measured differences are ~1e-6. 2e-5 is ~20x that, far below what a
# wrong cache entry or shard would cause (>= 1e-2).
LOGPROB_ATOL = 2e-5

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Once upon a time, in a land far away, there lived a king: he had three daughters.\n\n",
    "Hello world, hello model. Parallel training splits the model across ranks.\n",
    "Tensor parallelism splits every layer; pipeline parallelism splits the layers.\n",
] * 20

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time, there"]
SEED = 1234


def train_tokenizer(tmp_dir: str) -> tuple[str, str]:
    from lessons_pkg.data.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(CORPUS, vocab_size=300, output_dir=tmp_dir)


def tiny_config(vocab_size: int, **overrides) -> GPTConfig:
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, num_layers=4, num_attention_heads=4,
                  max_position_embeddings=48, hidden_dropout=0.0, attention_dropout=0.0,
                  make_vocab_size_divisible_by=8)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def tiny_model_weights(vocab_size: int) -> tuple[GPTConfig, dict]:
    config = tiny_config(vocab_size)
    return config, master_state_dict(config, seed=SEED)


def hf_greedy(hf_model, prompt: list[int], n: int, eod: int) -> list[int]:
    """``GPT2LMHeadModel.generate(do_sample=False)`` of one prompt, cut after the first end-of-document token."""
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=n, eos_token_id=eod, pad_token_id=eod)[0].tolist()
    generated = out[len(prompt):]
    if eod in generated:
        generated = generated[: generated.index(eod) + 1]
    return prompt + generated


def hf_log_probs(hf_model, tokens: list[int]) -> torch.Tensor:
    """``log p(token_{j+1} | tokens_{<=j})`` for every token after the first."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def hf_top_log_probs(hf_model, tokens: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens after every prefix: ``(log p [n - 1, k] float64, ids [n - 1, k])``."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, :-1].double()
    return logits.log_softmax(-1).topk(k, dim=-1)


def reference_beam_search(hf_model, prompt: list[int], n: int, beam_width: int, length_penalty: float,
                          stop_token: int) -> tuple[list[list[int]], list[float]]:
    """Plain beam search: the whole sequence recomputed every step, Megatron's rules, one process."""
    beams = [(list(prompt), 0.0)]                          # (tokens, sum of log-probs)
    finished: list[tuple[float, list[int]]] = []           # (score, tokens)

    def add(tokens, total, length):
        finished.append((total / length ** length_penalty, tokens))
        finished.sort(key=lambda h: -h[0])
        del finished[beam_width:]

    for step in range(n):
        candidates = []
        for b, (tokens, total) in enumerate(beams):
            with torch.no_grad():
                lp = hf_model(torch.tensor([tokens])).logits[0, -1].double().log_softmax(-1)
            candidates += [(total + float(lp[w]), b, w) for w in range(lp.numel())]
        candidates.sort(key=lambda c: -c[0])
        new_beams = []
        for rank, (total, b, w) in enumerate(candidates[: 2 * beam_width]):
            if w == stop_token:
                if rank < beam_width:
                    add(beams[b][0], total, step + 1)
            else:
                new_beams.append((beams[b][0] + [w], total))
            if len(new_beams) == beam_width:
                break
        best = candidates[0][0]
        if len(finished) == beam_width and finished[-1][0] >= best / (step + 1) ** length_penalty:
            break
        beams = new_beams
    else:
        for tokens, total in beams:
            add(tokens, total, n)
    return [t for _, t in finished], [s for s, _ in finished]
