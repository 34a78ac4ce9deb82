"""What a request may ask for: Megatron's ``PUT /api`` fields and OpenAI's ``POST /v1/completions``, validated.

Everything here runs on the serving rank *before* any collective: a request
that cannot be honoured raises :class:`BadRequest` (HTTP 400, a message naming
the field and its value) and never reaches the other ranks, so no bad request
can leave them out of step.

Megatron's ``PUT /api`` (megatron/inference/text_generation_server.py), its
defaults and rules::

    prompts                    list of 1..128 strings (an empty one needs add_BOS)
    tokens_to_generate   64    int >= 0; 0 means "score the prompt" and needs logprobs=true
    logprobs             false bool
    temperature          1.0   0 < t <= 100
    top_k                0     int in [0, 1000]; top_k=1 is greedy decoding
    top_p                0.0   [0, 1]; not together with top_k > 0
    top_p_decay          0.0   [0, 1]; needs top_p
    top_p_bound          0.0   (0, top_p]; needs top_p
    add_BOS, stop_on_eol, stop_on_double_eol, prevent_newline_after_colon, no_log   false  bool
    random_seed          -1    int >= 0 when given
    beam_width           none  int >= 1; one prompt only
    length_penalty       1.0   number (beam search)
    stop_token           eod   token id (beam search; Megatron's default 50256 is GPT-2's eod)

Where Megatron answers some errors with status 200 and plain text, or accepts
``top_p: 1`` only when written ``1.0``, we answer 400 with ``{"message": ...}``
and accept any JSON number where a number is meant. Unknown fields are errors
(a typo such as ``top-k`` would otherwise be ignored silently).

OpenAI's ``POST /v1/completions`` (the legacy Completions API) takes every
field OpenAI documents; ``null`` means "not given". How each maps::

    prompt          string, list of strings, list of token ids, or list of token-id lists
                    (an empty string is the end-of-document token alone: "the beginning of a new document")
    max_tokens 16   tokens_to_generate; 0 with echo scores the prompt
    temperature 1   0 is greedy (top_k=1); (0, 2] samples
    top_p 1         1 is the whole distribution (Megatron's top_p=0)
    seed            random_seed (a seeded request runs alone, so it repeats exactly)
    n 1, best_of n  best_of rows per prompt in one batch (the sampler's generator draws each row's own
                    numbers, so the rows differ); the n of highest mean log-probability per generated
                    token are returned, index = prompt index * n + j; best_of > 1 cannot be streamed
    logprobs        0..5: the chosen tokens' log-probs, plus the k most likely tokens (top_n_logprobs)
    stop            up to 4 strings; generation of a prompt stops at the first one (cut from the text)
    echo, stream    the prompt before the text; server-sent events
    stream_options  {"include_usage": true}: a last chunk with the usage (only with stream)
    user            accepted, not used; suffix, logit_bias: only when empty;
    presence_penalty, frequency_penalty: only 0 (the engine has no penalties)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_PROMPTS = 128  # Megatron's limit per request

# the engine's SamplingParams fields that PUT /api takes, with Megatron's defaults (lessons_pkg.inference.SamplingParams)
API_SAMPLING = {
    "tokens_to_generate": 64, "logprobs": False, "temperature": 1.0, "top_k": 0, "top_p": 0.0,
    "top_p_decay": 0.0, "top_p_bound": 0.0, "add_BOS": False, "stop_on_eol": False,
    "stop_on_double_eol": False, "prevent_newline_after_colon": False, "random_seed": -1,
}
# ... and what OpenAI's logprobs: k adds (Megatron-core's name): every request's sampling dict has these keys
SAMPLING_DEFAULTS = dict(API_SAMPLING, top_n_logprobs=0)
API_FIELDS = {"prompts", *API_SAMPLING, "beam_width", "length_penalty", "stop_token", "no_log"}


class BadRequest(ValueError):
    """A request that cannot be honoured: HTTP 400 with ``{"message": str(self)}``."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class GenerateRequest:
    """One validated request, ready for the queue: prompts, sampling fields, beam search or not."""

    prompts: list                        # strings, or token-id lists (OpenAI)
    sampling: dict                       # SAMPLING_DEFAULTS' keys
    prompt_lengths: list[int]            # tokens of each prompt, BOS included
    beam_width: int | None = None
    length_penalty: float = 1.0
    stop_token: int | None = None
    no_log: bool = False
    stop: list[str] = field(default_factory=list)   # OpenAI stop strings (cut after generation)

    @property
    def greedy(self) -> bool:
        return self.beam_width is None and self.sampling["top_k"] == 1


def parse_json(body: bytes) -> object:
    """The request body as JSON; NaN and Infinity (which Python's json accepts) are errors."""
    def no_constants(name):
        raise BadRequest(f"request body: {name} is not valid JSON")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None


# ---- small typed getters: each error names the field and the value ------------------------------------
def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bool(req: dict, name: str, default: bool) -> bool:
    value = req.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be a boolean value, got {_show(value)}", name)
    return value


def _int(req: dict, name: str, default):
    value = req.get(name, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {_show(value)}", name)
    return value


def _number(req: dict, name: str, default):
    value = req.get(name, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number, got {_show(value)}", name)
    return float(value)


def _prompts(value, name: str, allow_str: bool = False) -> list[str]:
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest(f"{name} must be a list of strings, got {_show(value)}", name)
    if not value:
        raise BadRequest(f"{name} is empty", name)
    if len(value) > MAX_PROMPTS:
        raise BadRequest(f"{name}: {len(value)} prompts, the maximum is {MAX_PROMPTS}", name)
    return value


def check_sampling(s: dict) -> None:
    """Megatron's rules on the sampling fields (types already checked)."""
    if s["tokens_to_generate"] < 0:
        raise BadRequest(f"tokens_to_generate must be >= 0, got {s['tokens_to_generate']}", "tokens_to_generate")
    if s["tokens_to_generate"] == 0 and not s["logprobs"]:
        raise BadRequest("tokens_to_generate=0 (scoring) needs logprobs=true", "logprobs")
    if not 0.0 < s["temperature"] <= 100.0:
        raise BadRequest(f"temperature must be > 0 and <= 100.0, got {s['temperature']}", "temperature")
    if not 0 <= s["top_k"] <= 1000:
        raise BadRequest(f"top_k must be in [0, 1000], got {s['top_k']}", "top_k")
    if not 0.0 <= s["top_p"] <= 1.0:
        raise BadRequest(f"top_p must be in [0, 1], got {s['top_p']}", "top_p")
    if s["top_p"] > 0.0 and s["top_k"] > 0:
        raise BadRequest(f"cannot set both top_k ({s['top_k']}) and top_p ({s['top_p']})", "top_p")
    if s["top_p_decay"] and s["top_p"] == 0.0:
        raise BadRequest(f"top_p_decay ({s['top_p_decay']}) cannot be set without top_p", "top_p_decay")
    if not 0.0 <= s["top_p_decay"] <= 1.0:
        raise BadRequest(f"top_p_decay must be in [0, 1], got {s['top_p_decay']}", "top_p_decay")
    if s["top_p_bound"]:
        if s["top_p"] == 0.0:
            raise BadRequest(f"top_p_bound ({s['top_p_bound']}) cannot be set without top_p", "top_p_bound")
        if not 0.0 < s["top_p_bound"] <= s["top_p"]:
            raise BadRequest(f"top_p_bound must be > 0 and <= top_p ({s['top_p']}), got {s['top_p_bound']}",
                             "top_p_bound")
    if s["random_seed"] != -1 and s["random_seed"] < 0:
        raise BadRequest(f"random_seed must be an integer >= 0, got {s['random_seed']}", "random_seed")


def prompt_token_ids(prompts: list, add_bos: bool, tokenizer, name: str = "prompts") -> list[list[int]]:
    """Each prompt's token ids as the engine will see them (BOS first with ``add_bos``); ids must be in the vocabulary."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt and not add_bos:
                raise BadRequest(f"{name}[{i}] is empty: empty prompts require add_BOS=true", name)
            ids = tokenizer.tokenize(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise BadRequest(f"{name}[{i}] holds token ids outside the vocabulary [0, {tokenizer.vocab_size}): "
                                 f"{_show(bad[:5])}", name)
            ids = list(prompt)
        out.append(([tokenizer.eod] if add_bos else []) + ids)
    return out


def check_lengths(prompts: list, add_bos: bool, tokens_to_generate: int, tokenizer,
                  max_positions: int, name: str = "prompts") -> list[int]:
    """Token counts of the prompts (BOS included); an error if prompt + tokens_to_generate exceed the positions."""
    return fitting_lengths(prompt_token_ids(prompts, add_bos, tokenizer, name), tokens_to_generate, max_positions, name)


def fitting_lengths(prompt_ids: list[list[int]], tokens_to_generate: int, max_positions: int, name: str) -> list[int]:
    """``len`` of each prompt; an error if one + tokens_to_generate exceeds the model's positions."""
    for i, ids in enumerate(prompt_ids):
        n = len(ids)
        if n + tokens_to_generate > max_positions:
            raise BadRequest(f"{name}[{i}] has {n} tokens; with tokens_to_generate={tokens_to_generate} that is "
                             f"{n + tokens_to_generate}, beyond the model's {max_positions} positions", name)
    return [len(ids) for ids in prompt_ids]


def parse_api_request(req: object, tokenizer, max_positions: int, defaults: dict | None = None) -> GenerateRequest:
    """Megatron's ``PUT /api`` body -> :class:`GenerateRequest`, or :class:`BadRequest`.

    ``defaults`` replace Megatron's for the fields a request omits (the server's ``--temperature``,
    ``--top_k``, ``--top_p``; ``tokens_to_generate`` when ``--out-seq-length`` is below 64); a request's own
    values always win.
    """
    unknown = sorted(set(defaults or {}) - set(API_SAMPLING))
    if unknown:
        raise ValueError(f"defaults for unknown /api field(s) {unknown}")
    if not isinstance(req, dict):
        raise BadRequest(f"request body must be a JSON object, got {_show(req)}")
    api_defaults = dict(API_SAMPLING, **(defaults or {}))
    if "top_k" in req or "top_p" in req:  # a request that picks its sampling method takes none of the server's
        api_defaults.update(top_k=API_SAMPLING["top_k"], top_p=API_SAMPLING["top_p"])
    if "max_len" in req:
        raise BadRequest("max_len is no longer used; replace it with tokens_to_generate", "max_len")
    if "sentences" in req:
        raise BadRequest("sentences is no longer used; replace it with prompts", "sentences")
    unknown = sorted(set(req) - API_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; known: {sorted(API_FIELDS)}", unknown[0])
    if "prompts" not in req:
        raise BadRequest("prompts argument required", "prompts")
    prompts = _prompts(req["prompts"], "prompts")

    s = dict(SAMPLING_DEFAULTS)
    for name, default in api_defaults.items():
        if isinstance(default, bool):
            s[name] = _bool(req, name, default)
        elif isinstance(default, int):
            s[name] = _int(req, name, default)
        else:
            s[name] = _number(req, name, default)
    check_sampling(s)
    no_log = _bool(req, "no_log", False)

    beam_width = _int(req, "beam_width", None)
    length_penalty = _number(req, "length_penalty", 1.0)
    stop_token = _int(req, "stop_token", None)
    if beam_width is not None:
        if beam_width < 1:
            raise BadRequest(f"beam_width must be an integer >= 1, got {beam_width}", "beam_width")
        if len(prompts) > 1:
            raise BadRequest(f"beam search (beam_width={beam_width}) takes one prompt, got {len(prompts)}", "prompts")
        if s["tokens_to_generate"] == 0:
            raise BadRequest("beam search needs tokens_to_generate >= 1, got 0", "tokens_to_generate")
    else:
        for name in ("length_penalty", "stop_token"):
            if name in req:
                raise BadRequest(f"{name} ({_show(req[name])}) is a beam-search field: it needs beam_width", name)
    if stop_token is None:
        stop_token = tokenizer.eod
    elif not 0 <= stop_token < tokenizer.vocab_size:
        raise BadRequest(f"stop_token must be a token id in [0, {tokenizer.vocab_size}), got {stop_token}", "stop_token")

    if s["top_k"] >= tokenizer.vocab_size:
        raise BadRequest(f"top_k ({s['top_k']}) must be smaller than the vocabulary ({tokenizer.vocab_size})", "top_k")
    lengths = check_lengths(prompts, s["add_BOS"], s["tokens_to_generate"], tokenizer, max_positions)
    return GenerateRequest(prompts, s, lengths, beam_width, length_penalty, stop_token, no_log)


# ---- OpenAI's POST /v1/completions ------------------------------------------------------------------------
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs",
                     "echo", "stream", "stream_options", "n", "best_of", "presence_penalty", "frequency_penalty",
                     "logit_bias", "suffix", "user"}     # every field of OpenAI's legacy Completions API
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}   # obfuscation pads chunks: accepted, not used
MAX_LOGPROBS = 5                                        # OpenAI's maximum


@dataclass
class CompletionRequest:
    """An OpenAI request in the engine's terms: ``request.prompts`` holds ``best_of`` rows per prompt."""
    request: GenerateRequest
    echo: bool
    stream: bool
    logprobs: int | None                 # None: no logprobs in the answer; k: the top k alternatives (0: none)
    n: int = 1
    best_of: int = 1
    include_usage: bool = False
    prompt_texts: list[str] = field(default_factory=list)      # each prompt as text (echo)
    prompt_ids: list[list[int]] = field(default_factory=list)  # each prompt's token ids (what the engine sees)

    def rows(self, prompt: int) -> range:
        """The engine rows of prompt ``prompt``."""
        return range(prompt * self.best_of, (prompt + 1) * self.best_of)


def _openai_prompts(value) -> list:
    """OpenAI's four prompt forms -> a list of strings and token-id lists."""
    def ids(x):
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        prompts = [value]
    elif ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and (all(isinstance(p, str) for p in value) or all(ids(p) for p in value)):
        prompts = value
    elif value == []:
        raise BadRequest("prompt is empty", "prompt")
    else:
        raise BadRequest(f"prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                         f"lists, got {_show(value)}", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"prompt: {len(prompts)} prompts, the maximum is {MAX_PROMPTS}", "prompt")
    return prompts


def _empty_or_default(req: dict, name: str, default, why: str) -> None:
    if req.get(name, default) != default:
        raise BadRequest(f"{name} is not supported ({why}), got {_show(req[name])}", name)


def parse_completion_request(req: object, tokenizer, max_positions: int, model_name: str) -> CompletionRequest:
    """OpenAI's completions body -> a :class:`CompletionRequest` (the engine's rows), or :class:`BadRequest`."""
    if not isinstance(req, dict):
        raise BadRequest(f"request body must be a JSON object, got {_show(req)}")
    req = {k: v for k, v in req.items() if v is not None}          # null: not given (OpenAI's nullable fields)
    unknown = sorted(set(req) - COMPLETION_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; OpenAI's completions fields are {sorted(COMPLETION_FIELDS)}",
                         unknown[0])
    model = req.get("model", model_name)
    if model != model_name:
        raise BadRequest(f"model {_show(model)} is not served here; this server serves {model_name!r}", "model")
    if "prompt" not in req:
        raise BadRequest("prompt is required", "prompt")
    prompts = _openai_prompts(req["prompt"])
    for name in ("presence_penalty", "frequency_penalty"):
        _empty_or_default(req, name, 0, "the engine has no penalties: must be 0")
    _empty_or_default(req, "suffix", "", "this server only continues a prompt, it does not insert: must be empty")
    _empty_or_default(req, "logit_bias", {}, "the engine does not bias logits: must be empty")
    if not isinstance(req.get("user", ""), str):
        raise BadRequest(f"user must be a string, got {_show(req['user'])}", "user")

    max_tokens = _int(req, "max_tokens", 16)
    if max_tokens < 0:
        raise BadRequest(f"max_tokens must be an integer >= 0, got {max_tokens}", "max_tokens")
    temperature = _number(req, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest(f"temperature must be in [0, 2], got {_show(temperature)}", "temperature")
    top_p = _number(req, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {_show(top_p)}", "top_p")
    seed = _int(req, "seed", None)
    if seed is not None and seed < 0:
        raise BadRequest(f"seed must be an integer >= 0, got {seed}", "seed")
    logprobs = _int(req, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise BadRequest(f"logprobs must be in [0, {MAX_LOGPROBS}] (OpenAI's maximum), got {logprobs}", "logprobs")
    echo = _bool(req, "echo", False)
    stream = _bool(req, "stream", False)
    if max_tokens == 0 and not echo:
        raise BadRequest("max_tokens=0 returns nothing unless echo=true", "max_tokens")

    n = _int(req, "n", 1)
    if n < 1:
        raise BadRequest(f"n must be an integer >= 1, got {n}", "n")
    best_of = _int(req, "best_of", n)
    if best_of < n:
        raise BadRequest(f"best_of ({best_of}) must be >= n ({n})", "best_of")
    if stream and best_of > 1 and "best_of" in req:
        raise BadRequest(f"best_of={best_of} cannot be streamed (the best are known only at the end); "
                         "use n for several streamed choices", "best_of")
    if len(prompts) * best_of > MAX_PROMPTS:
        raise BadRequest(f"{len(prompts)} prompt(s) x best_of {best_of} = {len(prompts) * best_of} completions, "
                         f"the maximum is {MAX_PROMPTS}", "n" if "best_of" not in req else "best_of")

    include_usage = False
    if "stream_options" in req:
        options = req["stream_options"]
        if not stream:
            raise BadRequest("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - STREAM_OPTIONS:
            raise BadRequest(f"stream_options must be an object with keys among {sorted(STREAM_OPTIONS)}, "
                             f"got {_show(options)}", "stream_options")
        include_usage = _bool(options, "include_usage", False)
        _bool(options, "include_obfuscation", True)

    stop = req.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 4:
        raise BadRequest(f"stop must be a non-empty string or a list of up to 4 of them, got {_show(req['stop'])}",
                         "stop")

    s = dict(SAMPLING_DEFAULTS)
    s.update(tokens_to_generate=max_tokens, logprobs=logprobs is not None or max_tokens == 0 or best_of > n,
             top_n_logprobs=logprobs or 0)
    if temperature == 0.0:
        s["top_k"] = 1                                   # greedy
    else:
        s["temperature"] = temperature
        s["top_p"] = 0.0 if top_p == 1.0 else top_p
    if seed is not None:
        s["random_seed"] = seed
    check_sampling(s)

    texts = [p if isinstance(p, str) else tokenizer.detokenize(p) for p in prompts]
    prompts = [[tokenizer.eod] if p == "" else p for p in prompts]   # "" = the start of a new document
    ids = prompt_token_ids(prompts, False, tokenizer, "prompt")
    lengths = fitting_lengths(ids, max_tokens, max_positions, "prompt")
    rows = [p for p in prompts for _ in range(best_of)]       # best_of rows per prompt, side by side
    gen = GenerateRequest(rows, s, [n for n in lengths for _ in range(best_of)], stop=stop)
    return CompletionRequest(gen, echo, stream, logprobs, n, best_of, include_usage, texts, ids)

