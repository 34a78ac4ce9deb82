"""InferenceEngine: incremental decoding of a TP x PP ``ParallelGPT`` with a key/value cache.

Every rank of one model replica builds the engine on its own stage and calls
:meth:`InferenceEngine.generate` with the same arguments (a collective). The
batch is right-padded (``tokenization.py``), so column j is position j of
every row and decoding walks the columns::

    prefill    columns [0, shortest prompt)          one forward over all of them, cache filled
    step       column c -> the token of column c + 1  one forward of ONE column, cache grows by one

At each step the first stage embeds column c; hidden states go stage to
stage; the last stage's TP ranks each hold the logits of their vocabulary
slice; the sampler (TP rank 0 of the last stage) gathers them, picks the
next tokens, and one all-reduce hands them to every rank (``communication.py``).
A row whose prompt is longer than c keeps its prompt token instead: it
"starts" generating at its own length. Each prompt gets ``tokens_to_generate``
tokens unless it stops earlier (end-of-document, end-of-line rules, cancel),
so its answer does not depend on the other prompts of the batch. (Megatron
gives every row ``longest prompt + tokens_to_generate`` in total, so shorter
prompts get more tokens there; we keep each request's own count, which the
batching server relies on.)

Log-probabilities (``params.logprobs``) are those of the model's
distribution over the real vocabulary (before temperature, top-k/top-p),
for every token after the first, computed on the last stage without
gathering the logits (``log_probs.py``); ``params.top_n_logprobs = k`` adds
the k most likely tokens at every position, from the same vocab-parallel
logits. Rank 0's callback also receives each step's log-probabilities (a
:class:`StepLogProbs`, for streaming them): with one pipeline stage rank 0
is the sampler and has them; with several, the sampler sends them to rank 0
(one point-to-point message per step, only when ``params.logprobs``).

Prompts are strings or lists of token ids (OpenAI accepts both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from lessons_pkg.inference.communication import (StageLink, StepSync, gather_to_sampler, group_ranks, model_group,
                                                 share)
from lessons_pkg.inference.kv_cache import KVCache
from lessons_pkg.inference.log_probs import vocab_parallel_log_probs, vocab_parallel_top_log_probs
from lessons_pkg.inference.params import GenerationError, SamplingParams, check_lengths
from lessons_pkg.inference.sampling import next_top_p, sample
from lessons_pkg.inference.tokenization import TokenText, pad_batch

TopLogProbs = list[tuple[int, float]]      # the k most likely (token id, log p) at one position, best first


@dataclass
class StepLogProbs:
    """One step's new log-probabilities, for rank 0's callback (``params.logprobs``).

    ``values[i][j]`` is log p of the token in column ``start + 1 + j`` of row
    i, i.e. ``TokenOutput.logprobs[i][start + j]``; ``top[i][j]`` its
    position's k most likely tokens (``params.top_n_logprobs``; None when 0).
    The first step covers the prompt columns, each later step one column.
    """
    start: int
    values: list[list[float]]
    top: list[list[TopLogProbs]] | None = None


# callback(step, new_tokens, step_log_probs or None) -> prompts to cancel (or None); rank 0 only
Callback = Callable[[int, list, "StepLogProbs | None"], "set[int] | None"]


@dataclass
class TokenOutput:
    """Token-level result: ``tokens[i]`` = prompt + generated ids of prompt i; ``logprobs[i]`` has one fewer.

    ``top_n_logprobs[i][j]``: the k most likely tokens where ``logprobs[i][j]`` was taken.
    """
    tokens: list[list[int]]
    prompt_lengths: list[int]
    logprobs: list[list[float]] | None = None
    top_n_logprobs: list[list[TopLogProbs]] | None = None


def _pairs(positions: list) -> list[TopLogProbs]:
    """``[[log p, id] x k]`` per position (a tensor's ``.tolist()``) -> lists of (token id, log p)."""
    return [[(int(i), v) for v, i in position] for position in positions]


def _group_info(group) -> tuple[int, int]:
    if dist.is_initialized() and group is not None:
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class InferenceEngine:
    """Generation on one TP x PP replica of a ``ParallelGPT``; build it on every rank of the replica.

    ``model`` is this rank's stage (``load_pretrained`` + ``build_stage``),
    ``tp_group``/``pp_group`` its tensor and pipeline groups (None: the
    model's own tensor group, and a single stage). With TP > 1 and PP > 1 the
    constructor is itself a collective (it creates the model group).

    A server validates a request on its serving rank first, with
    :meth:`validate_request` / :meth:`validate_beam_request` (no
    communication, the same checks ``generate`` and ``beam_search`` run on
    every rank), and answers a bad one without starting any collective.
    """

    def __init__(self, model, tokenizer=None, tp_group=None, pp_group=None, eod: int | None = None,
                 seed: int | None = None):
        """``seed``: requests without a ``random_seed`` draw their seeds from a generator seeded with it (the
        same requests in the same order then repeat, as under Megatron's ``--seed``); None: fresh each time."""
        self.model = model.eval()
        self._seeds = None if seed is None else torch.Generator().manual_seed(seed)
        self.config = model.config
        self.tp_group = tp_group if tp_group is not None else model.tp_group
        self.pp_group = pp_group
        self.tp_rank, self.tp_size = _group_info(self.tp_group)
        self.pp_rank, self.pp_size = _group_info(pp_group)
        if model.pre_process != (self.pp_rank == 0) or model.post_process != (self.pp_rank == self.pp_size - 1):
            raise ValueError(f"the model stage (pre_process={model.pre_process}, post_process={model.post_process}) "
                             f"is not stage {self.pp_rank} of a {self.pp_size}-stage pipeline")
        if tokenizer is None and eod is None:
            raise ValueError("an engine needs a tokenizer, or at least the end-of-document id (eod=)")
        self.text = TokenText(tokenizer) if tokenizer is not None else None
        self.eod = eod if eod is not None else tokenizer.eod
        self.vocab_size = self.config.vocab_size
        self.max_positions = self.config.max_position_embeddings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.is_first, self.is_last = model.pre_process, model.post_process
        self.is_sampler = self.is_last and self.tp_rank == 0      # draws every token, alone
        self.is_rank0 = self.is_first and self.tp_rank == 0       # runs the callback (the server's rank)
        self.global_rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = model_group(self.tp_group, pp_group)          # every rank of this replica
        self.link = StageLink(pp_group)
        stages = group_ranks(pp_group)                              # for TP rank 0: rank 0 ... the sampler
        self.rank0_global, self.sampler_global = stages[0], stages[-1]

    # -- text in, text out (Megatron's generate_and_post_process) ----------------------------------
    def generate(self, prompts: list, params: SamplingParams, callback: Callback | None = None) -> dict:
        """Prompts (strings or token-id lists) + generations on every rank (a collective):
        ``{"text", "segments", "logprobs", "top_n_logprobs", "tokens"}``."""
        prompt_ids = self.validate_request(prompts, params)
        out = self.generate_ids(prompt_ids, params, callback)
        return {
            "text": [self.text.detokenize(t) for t in out.tokens],
            "segments": [self.text.segments(t) for t in out.tokens],
            "logprobs": out.logprobs,
            "top_n_logprobs": out.top_n_logprobs,
            "tokens": out.tokens,
        }

    def beam_search(self, prompts: list[str], tokens_to_generate: int, beam_width: int,
                    length_penalty: float = 1.0, stop_token: int | None = None, add_BOS: bool = False,
                    prevent_newline_after_colon: bool = False) -> dict:
        """The ``beam_width`` best continuations of ONE prompt: ``{"text", "segments", "scores"}`` (a collective)."""
        from lessons_pkg.inference.beam_search import beam_search

        prompt_ids = self.validate_beam_request(prompts, tokens_to_generate, beam_width, length_penalty, stop_token,
                                                add_BOS)
        tokens, scores = beam_search(self, prompt_ids[0], tokens_to_generate, beam_width, length_penalty,
                                     self.eod if stop_token is None else stop_token, prevent_newline_after_colon)
        return {"text": [self.text.detokenize(t) for t in tokens],
                "segments": [self.text.segments(t) for t in tokens], "scores": scores}

    def validate_request(self, prompts: list, params: SamplingParams) -> list[list[int]]:
        """Every check of :meth:`generate`, on this rank alone; returns the prompts' token ids."""
        prompt_ids = self.tokenize(prompts, params.add_BOS)
        self._validate_ids(prompt_ids, params)
        return prompt_ids

    def validate_beam_request(self, prompts: list[str], tokens_to_generate: int, beam_width: int,
                              length_penalty: float = 1.0, stop_token: int | None = None,
                              add_BOS: bool = False) -> list[list[int]]:
        """Every check of :meth:`beam_search`, on this rank alone; returns the prompt's token ids."""
        from lessons_pkg.inference.beam_search import check_beam_arguments

        if not isinstance(prompts, list) or len(prompts) != 1:
            raise ValueError(f"beam search takes exactly one prompt (batch size 1), got "
                             f"{len(prompts) if isinstance(prompts, list) else type(prompts).__name__}")
        prompt_ids = self.tokenize(prompts, add_BOS)
        check_beam_arguments(tokens_to_generate, beam_width, length_penalty,
                             self.eod if stop_token is None else stop_token, self.vocab_size)
        self.check_prompt_ids(prompt_ids)
        check_lengths([len(prompt_ids[0])], tokens_to_generate, self.max_positions, add_BOS)
        return prompt_ids

    def tokenize(self, prompts, add_BOS: bool) -> list[list[int]]:
        """The prompts' token ids (``add_BOS``: the end-of-document token first); a prompt may be ids already."""
        if self.text is None:
            raise ValueError("this engine has no tokenizer: use generate_ids with token ids")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, (str, list)) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings or token-id lists, got {prompts!r:.80}")
        if not isinstance(add_BOS, bool):
            raise ValueError(f"add_BOS must be a boolean, got {add_BOS!r}")
        bos = [self.text.eod] if add_BOS else []                   # as TokenText.tokenize_prompts
        return [bos + (self.text.tokenizer.tokenize(p) if isinstance(p, str) else list(p)) for p in prompts]

    # -- token ids in, token ids out ------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     callback: Callback | None = None) -> TokenOutput:
        """Generation (or scoring, when ``tokens_to_generate == 0``) from token ids; a collective."""
        self._validate_ids(prompt_ids, params)
        with torch.inference_mode():
            if params.tokens_to_generate == 0:
                return self._score(prompt_ids, params.top_n_logprobs)
            return self._generate(prompt_ids, params, callback)

    def _validate_ids(self, prompt_ids, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        self.check_prompt_ids(prompt_ids)
        params.validate(self.max_positions, [len(p) for p in prompt_ids])
        if params.top_k >= self.vocab_size:
            raise ValueError(f"top_k ({params.top_k}) must be smaller than the vocabulary ({self.vocab_size})")
        if params.top_n_logprobs > self.vocab_size:
            raise ValueError(f"top_n_logprobs ({params.top_n_logprobs}) exceeds the vocabulary ({self.vocab_size})")

    def check_prompt_ids(self, prompt_ids) -> None:
        if not isinstance(prompt_ids, list) or not prompt_ids:
            raise ValueError("give at least one prompt")
        for i, ids in enumerate(prompt_ids):
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} holds ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    # -- one forward pass through the pipeline ---------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: KVCache | None, last_only: bool
                ) -> tuple[torch.Tensor | None, BaseException | None]:
        """``tokens [b, s]`` (the columns to feed) through every stage; the last stage returns logits ``[b, s', V/tp]``.

        An exception in this rank's stage is caught and returned, and the
        stage passes zeros on so its neighbours are not left waiting; the
        caller reports it in the next :class:`StepSync` so all ranks stop together.
        """
        b, s = tokens.shape
        error = None
        if self.is_first:
            x = tokens
        else:
            x = self.link.recv_forward((b, s, self.config.hidden_size), self.dtype, self.device)
        try:
            if cache is None:
                y = self.model(x, last_position_only=last_only)
            else:
                y = self.model(x, kv_cache=cache, last_position_only=last_only)
        except Exception as e:  # noqa: BLE001 - reported to every rank by the next StepSync
            error = e
            width = self.model.padded_vocab_size // self.tp_size if self.is_last else self.config.hidden_size
            y = torch.zeros(b, 1 if (last_only and self.is_last) else s, width, dtype=self.dtype, device=self.device)
        if not self.is_last:
            self.link.send_forward(y)
            return None, error
        return y, error

    def _raise_if_failed(self, failed: int | None, local: BaseException | None) -> None:
        if failed is None:
            return
        if local is not None:
            raise GenerationError(f"generation failed on rank {self.global_rank}: {local!r}") from local
        raise GenerationError(f"generation failed on rank {failed} (see that rank's error); stopped on every rank")

    def _share_log_probs(self, log_probs: torch.Tensor | None, shape, dtype=torch.float32) -> torch.Tensor:
        """The last stage's log-probabilities to every rank (the sampler's copy; SUM with zeros is exact)."""
        mine = log_probs if self.is_sampler else torch.zeros(shape, dtype=dtype, device=self.device)
        return share(mine, self.is_sampler, self.group)

    def _top_log_probs(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """``[b, s, k, 2]`` float64: (log p, token id) of the k most likely tokens at every position (last stage)."""
        values, ids = vocab_parallel_top_log_probs(logits, k, self.vocab_size, self.tp_group)
        return torch.stack((values.double(), ids.double()), dim=-1)

    @staticmethod
    def _top_lists(top: torch.Tensor, row: int, n: int) -> list[TopLogProbs]:
        """Row ``row``'s first ``n`` positions of a ``[b, s, k, 2]`` tensor as lists of (id, log p)."""
        return _pairs(top[row, :n].tolist())

    def _step_log_probs(self, log_probs: torch.Tensor, top: torch.Tensor | None, prev: int, ctx: int
                        ) -> StepLogProbs | None:
        """Rank 0's copy of columns ``prev .. ctx - 1`` of the log-probabilities (None on every other rank).

        With one stage rank 0 is the sampler; with several, the sampler sends
        ``[b, w, 1 + 2k]`` (log p, then the top k's (log p, id) pairs) to rank 0.
        """
        if not (self.is_rank0 or self.is_sampler):
            return None
        cols = log_probs[:, prev:ctx, None].double()                          # [b, w, 1]
        if top is not None:
            cols = torch.cat((cols, top[:, prev:ctx].flatten(2)), dim=-1)      # [b, w, 1 + 2k]
        if self.pp_size > 1:
            if self.is_sampler:
                dist.send(cols.contiguous(), dst=self.rank0_global)
                return None
            cols = torch.empty_like(cols)
            dist.recv(cols, src=self.sampler_global)
        values = cols[..., 0].float().tolist()
        tops = None
        if top is not None:
            pairs = cols[..., 1:].unflatten(-1, (-1, 2)).tolist()             # [b][w][k] of [log p, id]
            tops = [_pairs(row) for row in pairs]
        return StepLogProbs(prev, values, tops)

    # -- scoring only -----------------------------------------------------------------------------
    def _score(self, prompt_ids: list[list[int]], k: int = 0) -> TokenOutput:
        tokens, lengths = pad_batch(prompt_ids, 0, self.eod, self.device)      # [b, longest]
        logits, error = self.forward(tokens, None, last_only=False)
        log_probs = top = None
        if self.is_last and error is None:
            try:
                log_probs = vocab_parallel_log_probs(logits[:, :-1], tokens[:, 1:], self.vocab_size, self.tp_group)
                if k:
                    top = self._top_log_probs(logits[:, :-1], k)
            except Exception as e:  # noqa: BLE001
                error = e
        _, _, failed = StepSync(self.group, 0, 0, self.device).exchange(None, None, self._rank_if(error))
        self._raise_if_failed(failed, error)
        b, s = tokens.size(0), tokens.size(1) - 1
        log_probs = self._share_log_probs(log_probs, (b, s))
        lens = lengths.tolist()
        tops = None
        if k:
            top = self._share_log_probs(top, (b, s, k, 2), torch.float64)
            tops = [self._top_lists(top, i, n - 1) for i, n in enumerate(lens)]
        return TokenOutput([list(p) for p in prompt_ids], lens,
                           [log_probs[i, : n - 1].tolist() for i, n in enumerate(lens)], tops)

    def _rank_if(self, error) -> int | None:
        return self.global_rank if error is not None else None

    # -- generation -----------------------------------------------------------------------------
    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, callback: Callback | None
                  ) -> TokenOutput:
        ttg = params.tokens_to_generate
        tokens, lengths = pad_batch(prompt_ids, ttg, self.eod, self.device)   # [b, longest + ttg], [b]
        b, width = tokens.shape
        check_lengths(lengths.tolist(), ttg, self.max_positions)
        cache = KVCache.for_model(self.model, b, width)
        sync = StepSync(self.group, b, b, self.device)
        generator = None
        if self.is_sampler:
            generator = torch.Generator(device=self.device)
            if params.random_seed >= 0:
                generator.manual_seed(params.random_seed)
            elif self._seeds is not None:
                generator.manual_seed(int(torch.randint(2 ** 62, (), generator=self._seeds)))  # the engine's seed
            else:
                generator.seed()                                               # fresh, unrepeatable
        text = self.text
        eol = text.eol if text else None
        double_eol = text.double_eol if text else None
        colon = text.colon if text else None
        log_probs = torch.zeros(b, width - 1, dtype=torch.float32, device=self.device) if params.logprobs else None
        k = params.top_n_logprobs
        top = torch.zeros(b, width - 1, k, 2, dtype=torch.float64, device=self.device) if k else None

        end = lengths + ttg                         # [b] where each row would end without a stop
        out_len = end.clone()
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        cancel_next = None                          # rank 0: cancel flags from the last callback
        callback_error = None                       # rank 0: reported in the next exchange, like any error
        top_p = params.top_p
        prev = 0
        first = int(lengths.min())
        for ctx in range(first, width):             # column ctx receives a token
            logits, error = self.forward(tokens[:, prev:ctx], cache, last_only=not params.logprobs)
            draws = None
            if self.is_last:
                last = logits[:, -1, :] if error is None else torch.zeros(
                    b, logits.size(-1), dtype=logits.dtype, device=self.device)
                full = gather_to_sampler(last, self.tp_group)                 # [b, V_padded] on the sampler
                if self.is_sampler and error is None:
                    try:
                        full = full[:, : self.vocab_size].float()             # the padding is never a candidate
                        if params.prevent_newline_after_colon and colon is not None and eol is not None:
                            full[tokens[:, ctx - 1] == colon, eol] = -1e10    # no "\n" right after ":"
                        draws = sample(full, params.top_k, top_p, params.temperature, generator)
                    except Exception as e:  # noqa: BLE001
                        error = e
            top_p = next_top_p(top_p, params.top_p_decay, params.top_p_bound)

            error = error or callback_error
            draws, cancel, failed = sync.exchange(draws, cancel_next, self._rank_if(error))
            self._raise_if_failed(failed, error)
            cancel_next = None

            started = lengths <= ctx                # column ctx is past this row's prompt
            cancelled = cancel.bool() & ~done
            out_len = torch.where(cancelled, torch.maximum(lengths, torch.full_like(lengths, ctx)), out_len)
            done |= cancelled
            active = started & ~done                # rows that receive a generated token now
            tokens[:, ctx] = torch.where(active, draws, tokens[:, ctx])
            stop = self._stops(draws, tokens, ctx, params, eol, double_eol) & active
            out_len = torch.where(stop, torch.full_like(out_len, ctx + 1), out_len)
            done |= stop | (active & (end <= ctx + 1))

            step_log_probs = None
            if params.logprobs:
                if self.is_last:                    # log p of the tokens in columns prev+1 .. ctx
                    log_probs[:, prev:ctx] = vocab_parallel_log_probs(
                        logits, tokens[:, prev + 1: ctx + 1], self.vocab_size, self.tp_group)
                    if k:
                        top[:, prev:ctx] = self._top_log_probs(logits, k)
                step_log_probs = self._step_log_probs(log_probs, top, prev, ctx)

            if callback is not None and self.is_rank0:
                new = [int(t) if a else None for t, a in zip(draws.tolist(), active.tolist())]
                try:
                    gone = callback(ctx - first, new, step_log_probs)
                except Exception as e:  # noqa: BLE001 - stops every rank at the next exchange
                    callback_error, gone = e, None
                if gone:
                    cancel_next = torch.zeros(b, dtype=torch.bool, device=self.device)
                    cancel_next[[i for i in gone if 0 <= i < b]] = True
            prev = ctx
            if bool(done.all()):                   # every rank computes the same `done`
                break

        # a closing exchange: a failure of the last callback still stops every rank alike
        _, _, failed = StepSync(self.group, 0, 0, self.device).exchange(None, None, self._rank_if(callback_error))
        self._raise_if_failed(failed, callback_error)
        rows = tokens.tolist()
        lens = out_len.tolist()
        lps = tops = None
        if log_probs is not None:
            log_probs = self._share_log_probs(log_probs, log_probs.shape)
            lps = [log_probs[i, : n - 1].tolist() for i, n in enumerate(lens)]
        if top is not None:
            top = self._share_log_probs(top, top.shape, torch.float64)
            tops = [self._top_lists(top, i, n - 1) for i, n in enumerate(lens)]
        return TokenOutput([row[:n] for row, n in zip(rows, lens)], lengths.tolist(), lps, tops)

    def _stops(self, draws, tokens, ctx, params: SamplingParams, eol, double_eol) -> torch.Tensor:
        """Rows whose new token ends them: end-of-document, and Megatron's end-of-line rules when asked."""
        stop = torch.zeros_like(draws, dtype=torch.bool)
        if params.use_eod_token_for_early_termination:
            stop |= draws == self.eod
        if params.stop_on_double_eol:
            if double_eol is not None:
                stop |= draws == double_eol
            if eol is not None:
                stop |= (draws == eol) & (tokens[:, ctx - 1] == eol)
        elif params.stop_on_eol:
            for t in (eol, double_eol):
                if t is not None:
                    stop |= draws == t
        return stop
