"""Text generation from a TP x PP ParallelGPT (chapter 6): Megatron-LM's text generation, one idea per module.

    params         SamplingParams (Megatron's names, defaults, validation) and GenerationError
    kv_cache       KVCache: each rank keeps the keys and values of its own heads and layers
    communication  hidden states stage to stage, logits to the sampler, tokens to every rank
    sampling       greedy, temperature, top-k, top-p on the full-vocabulary logits (one rank draws)
    log_probs      log p of chosen tokens, and the top k, from vocab-parallel logits without gathering them
    tokenization   prompts to a right-padded batch; tokens to text and per-token segments
    engine         InferenceEngine: prefill, then one forward of one column per step
    beam_search    Megatron's beam search on the cached model

    engine = InferenceEngine(build_stage(pre, tp_group, pp_rank, pp_size), pre.tokenizer, tp_group, pp_group)
    out = engine.generate(["Hello"], SamplingParams(tokens_to_generate=16, top_k=1))   # on every rank
"""
from lessons_pkg.inference.engine import InferenceEngine, StepLogProbs, TokenOutput
from lessons_pkg.inference.kv_cache import KVCache
from lessons_pkg.inference.params import GenerationError, SamplingParams

__all__ = ["GenerationError", "InferenceEngine", "KVCache", "SamplingParams", "StepLogProbs", "TokenOutput"]
