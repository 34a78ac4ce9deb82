"""Beam search on the cached TP x PP model: Megatron-LM's rules (``beam_utils.py``, ``generation.py``).

One prompt; ``beam_width`` rows share its prefix. At each step the sampler
(TP rank 0 of the last stage) takes the full-vocabulary log-probabilities of
each beam's next token, adds them to the beams' scores, and keeps the best
candidates::

    candidates   the 2 x beam_width best (beam, token) pairs (the first step: of beam 0 only,
                 the beams being identical)
    stop token   a finished hypothesis, score = sum of log-probs / generated_length ** length_penalty,
                 kept only if it ranks among the first beam_width candidates
    other        continues as one of the next beam_width beams
    done         when beam_width hypotheses are finished and none of the open beams can beat
                 the worst of them: best open sum / length ** length_penalty <= worst finished score

The new beams' tokens and their parent beams go to every rank in one
all-reduce; each rank then reorders its key/value cache by parent
(``KVCache.reorder``), so every beam continues from its parent's keys and
values. At the end, open beams join the finished hypotheses and the best
``beam_width`` are returned, best first. A hypothesis is its prompt and
generated tokens (without the stop token).
"""
from __future__ import annotations

import torch

from lessons_pkg.inference.communication import StepSync, gather_to_sampler, share
from lessons_pkg.inference.kv_cache import KVCache
from lessons_pkg.inference.params import check_lengths


class BeamHypotheses:
    """The ``num_beams`` best finished hypotheses, with the worst score kept for the stopping rule."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, tokens: list[int], sum_log_probs: float, length: int) -> None:
        score = sum_log_probs / length ** self.length_penalty
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_log_probs: float, length: int) -> bool:
        if len(self) < self.num_beams:
            return False
        return self.worst_score >= best_sum_log_probs / length ** self.length_penalty


def check_beam_arguments(tokens_to_generate, beam_width, length_penalty, stop_token, vocab_size: int) -> None:
    if not isinstance(beam_width, int) or isinstance(beam_width, bool) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    if not isinstance(tokens_to_generate, int) or isinstance(tokens_to_generate, bool) or tokens_to_generate < 1:
        raise ValueError(f"tokens_to_generate must be an integer >= 1 for beam search, got {tokens_to_generate!r}")
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if not isinstance(stop_token, int) or isinstance(stop_token, bool) or not 0 <= stop_token < vocab_size:
        raise ValueError(f"stop_token must be an id in [0, {vocab_size}), got {stop_token!r}")
    if 2 * beam_width > vocab_size:
        raise ValueError(f"beam_width ({beam_width}) needs 2 x beam_width candidates, more than the "
                         f"vocabulary ({vocab_size})")


def select(log_probs: torch.Tensor, scores: torch.Tensor, first: bool, beam_width: int, stop_token: int,
           hyps: BeamHypotheses, tokens: torch.Tensor, prompt_length: int, ctx: int
           ) -> tuple[list[int], list[int], list[float], bool]:
    """One step of the sampler: ``(next tokens, parent beams, new scores, done)`` (Megatron's rules, above)."""
    vocab = log_probs.size(-1)
    new_scores = log_probs + scores.unsqueeze(1)                              # [beam, V]
    flat = new_scores[0] if first else new_scores.view(-1)
    best_scores, order = torch.sort(flat, descending=True)
    best_scores, order = best_scores[: 2 * beam_width], order[: 2 * beam_width]
    words, parents, kept = [], [], []
    for rank, (index, score) in enumerate(zip(order.tolist(), best_scores.tolist())):
        parent, word = divmod(index, vocab)
        if word == stop_token:
            if rank < beam_width:                                             # only among the best beam_width
                hyps.add(tokens[parent, :ctx].tolist(), score, ctx + 1 - prompt_length)
        else:
            words.append(word), parents.append(parent), kept.append(score)
        if len(words) == beam_width:
            break
    done = hyps.is_done(float(best_scores.max()), ctx + 1 - prompt_length)
    return words, parents, kept, done


def beam_search(engine, prompt: list[int], tokens_to_generate: int, beam_width: int, length_penalty: float,
                stop_token: int, prevent_newline_after_colon: bool) -> tuple[list[list[int]], list[float]]:
    """``(hypotheses, scores)``, best first, on every rank of ``engine``'s model (a collective)."""
    check_beam_arguments(tokens_to_generate, beam_width, length_penalty, stop_token, engine.vocab_size)
    engine.check_prompt_ids([prompt])
    p = len(prompt)
    check_lengths([p], tokens_to_generate, engine.max_positions)
    width = p + tokens_to_generate
    device = engine.device
    tokens = torch.full((beam_width, width), stop_token, dtype=torch.int64, device=device)
    tokens[:, :p] = torch.tensor(prompt, dtype=torch.int64, device=device)
    text = engine.text
    colon, eol = (text.colon, text.eol) if text is not None else (None, None)
    hyps = BeamHypotheses(beam_width, float(length_penalty))
    scores = torch.zeros(beam_width, dtype=torch.float64, device=device)   # meaningful on the sampler
    sync = StepSync(engine.group, 2 * beam_width + 1, 0, device)
    done = False
    with torch.inference_mode():
        cache = KVCache.for_model(engine.model, beam_width, width)
        prev = 0
        for ctx in range(p, width):
            logits, error = engine.forward(tokens[:, prev:ctx], cache, last_only=True)
            payload = None
            if engine.is_last:
                last = logits[:, -1, :] if error is None else torch.zeros(
                    beam_width, logits.size(-1), dtype=logits.dtype, device=device)
                full = gather_to_sampler(last, engine.tp_group)
                if engine.is_sampler and error is None:
                    try:
                        full = full[:, : engine.vocab_size].double()
                        if prevent_newline_after_colon and colon is not None and eol is not None:
                            full[tokens[:, ctx - 1] == colon, eol] = -1e10
                        words, parents, kept, stop = select(full.log_softmax(-1), scores, ctx == p, beam_width,
                                                            stop_token, hyps, tokens, p, ctx)
                        scores = torch.tensor(kept, dtype=torch.float64, device=device)
                        payload = torch.tensor(words + parents + [int(stop)], dtype=torch.int64, device=device)
                    except Exception as e:  # noqa: BLE001
                        error = e
            payload, _, failed = sync.exchange(payload, None, engine._rank_if(error))
            engine._raise_if_failed(failed, error)
            words, parents, done = payload[:beam_width], payload[beam_width:-1], bool(payload[-1])
            if done:
                break
            tokens = tokens[parents]
            tokens[:, ctx] = words
            cache.reorder(parents)
            prev = ctx
        return _finish(engine, hyps, tokens, scores, done, p, ctx, beam_width)


def _finish(engine, hyps: BeamHypotheses, tokens, scores, done: bool, p: int, ctx: int, beam_width: int):
    """Add the open beams (unless done), rank the hypotheses, and give them to every rank."""
    width = tokens.size(1)
    packed = torch.full((beam_width, width + 1), -1, dtype=torch.int64, device=engine.device)
    values = torch.zeros(beam_width, dtype=torch.float64, device=engine.device)
    if engine.is_sampler:
        if not done:
            for beam in range(beam_width):
                hyps.add(tokens[beam, : ctx + 1].tolist(), float(scores[beam]), ctx + 1 - p)
        ranked = sorted(hyps.beams, key=lambda h: h[0], reverse=True)
        for i, (score, hyp) in enumerate(ranked):
            packed[i, 0] = len(hyp)
            packed[i, 1: 1 + len(hyp)] = torch.tensor(hyp, dtype=torch.int64)
            values[i] = score
    packed = share(packed + 1, engine.is_sampler, engine.group) - 1        # -1 -> 0 so SUM with zeros works
    values = share(values, engine.is_sampler, engine.group)
    hypotheses, scores_out = [], []
    for i in range(beam_width):
        n = int(packed[i, 0])
        if n < 0:
            break
        hypotheses.append(packed[i, 1: 1 + n].tolist())
        scores_out.append(float(values[i]))
    return hypotheses, scores_out
