"""ParallelGPT: a GPT-2 whose every layer is tensor-parallel, buildable as one pipeline stage.

::

    input_ids [b, s] --VocabParallelEmbedding + position embedding--> [b, s, h]   (pre_process)
        --> layers layer_offset .. layer_offset + num_layers - 1                   (every stage)
        --> final LayerNorm --> x @ E_r^T = logits [b, s, V/tp]                     (post_process)
        --> cross_entropy(logits, labels) = loss [b, s]  (if labels; vocab-parallel when TP > 1)

The LM head is TIED to the word embedding E (``[V, h]``, rows split across
ranks): rank r's logits are those of its own vocabulary slice, exactly the
layout vocab-parallel cross entropy expects, so the logits are never gathered.
The hidden state enters the head through ``f`` (its gradient is summed over
ranks), the one collective of the head.

Pipeline stages: the first stage (``pre_process``) holds the embeddings and
takes ``input_ids``; the others take hidden states ``[b, s, h]``. The last
stage (``post_process``) holds the final LayerNorm and the head. A last stage
that is not also the first keeps its own copy of the word-embedding weight for
the head (as Megatron does); :meth:`ParallelGPT.shared_embedding_weight`
returns the weight whose gradient the trainer must all-reduce over
``parallel_state.get_embedding_group()`` so both copies stay equal.

Sequence parallelism (``config.sequence_parallel``, training only): the
embedding ends in a reduce-scatter, each rank adding the position embeddings
of its own tokens; hidden states between stages are ``[b, s/tp, h]``; the
head all-gathers the sequence (backward: reduce-scatter) in place of ``f``, so
logits and loss cover every token as without it. The trainer sums the
gradients of the parameters tagged ``sequence_parallel`` over the tensor group
(:func:`~lessons_pkg.tensor_parallel.sequence_parallel.allreduce_sequence_parallel_grads`).

Context parallelism (``cp_group``, training only): ``inputs`` are this rank's
tokens of each sequence (:func:`lessons_pkg.context_parallel.split_sequence`:
chunks r and ``2 cp - 1 - r``), their positions found from the rank; every
layer's attention is ring attention over the group; the logits and the
per-token loss are this rank's tokens' (``labels`` split alike).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lessons_pkg import parallel_state
from lessons_pkg.context_parallel.split import local_positions as local_positions_cp
from lessons_pkg.tensor_parallel.checkpointing import gather_full, shard_of
from lessons_pkg.tensor_parallel.config import GPTConfig, init_method_normal
from lessons_pkg.tensor_parallel.cross_entropy import cross_entropy
from lessons_pkg.tensor_parallel.dropout import dropout as apply_dropout
from lessons_pkg.tensor_parallel.layers import TPShape, VocabParallelEmbedding, mark_partitioned, resolve_tp_group
from lessons_pkg.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from lessons_pkg.tensor_parallel.random import checkpoint_rng_contexts, model_parallel_generator
from lessons_pkg.tensor_parallel.sequence_parallel import (
    check_sequence_parallel,
    linear_with_sequence_gather,
    local_positions,
    mark_sequence_parallel,
)
from lessons_pkg.tensor_parallel.transformer import LayerNorm, ParallelTransformerLayer

__all__ = ["GPTConfig", "ParallelGPT", "GPTEmbedding"]


class GPTEmbedding(nn.Module):
    """Vocab-parallel word embedding + replicated learned position embedding + dropout.

    Sequence-parallel: ``[b, s] -> [b, s/tp, h]``, this rank's tokens (the word embedding's
    reduce-scatter, plus the position embeddings of those tokens; dropout from the per-rank stream).
    """

    def __init__(self, config: GPTConfig, padded_vocab_size: int, tp_group: dist.ProcessGroup | None):
        super().__init__()
        init = init_method_normal(config.init_method_std)
        self.word_embeddings = VocabParallelEmbedding(padded_vocab_size, config.hidden_size, init, tp_group,
                                                      sequence_parallel=config.sequence_parallel)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        init(self.position_embeddings.weight)
        self.dropout = config.hidden_dropout
        self.sequence_parallel = self.word_embeddings.sequence_parallel
        if self.sequence_parallel:
            mark_sequence_parallel(self.position_embeddings.weight)  # rows of this rank's positions only

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        words = self.word_embeddings(input_ids)                       # [b, s] -> [b, s, h] (SP: [b, s/tp, h])
        generator = None
        if self.sequence_parallel:
            wp = self.word_embeddings
            position_ids = local_positions(position_ids, wp.tp_size, wp.tp_rank)   # [.., s] -> [.., s/tp]
            if self.training and self.dropout > 0:
                generator = model_parallel_generator(words.device)
        x = words + self.position_embeddings(position_ids)
        return apply_dropout(x, self.dropout, self.training, generator)


class ParallelGPT(nn.Module):
    """GPT-2 with Megatron tensor parallelism; the whole model or one pipeline stage of it.

    ``layer_offset`` / ``num_layers`` say which global layers this stage holds
    (default: all of ``config.num_layers``). ``forward(inputs, position_ids=None,
    labels=None)`` takes ``input_ids [b, s]`` on a ``pre_process`` stage and
    hidden states ``[b, s, h]`` otherwise; it returns hidden states ``[b, s, h]``
    unless ``post_process``, then vocab-parallel logits ``[b, s, padded_V/tp]``,
    or the per-token loss ``[b, s]`` when ``labels`` (already shifted, global
    ids) are given.
    """

    def __init__(self, config: GPTConfig, tp_group: dist.ProcessGroup | None = None, pre_process: bool = True,
                 post_process: bool = True, layer_offset: int = 0, num_layers: int | None = None,
                 cp_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config = config
        self.tp_group, self.tp_size, self.tp_rank = resolve_tp_group(tp_group)
        self.cp_group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        self.cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = config.sequence_parallel
        if self.sequence_parallel:
            check_sequence_parallel(self.tp_size)
        self.layer_offset = layer_offset
        self.num_layers = config.num_layers - layer_offset if num_layers is None else num_layers
        if layer_offset < 0 or self.num_layers < 0 or layer_offset + self.num_layers > config.num_layers:
            raise ValueError(f"layers [{layer_offset}, {layer_offset + self.num_layers}) are not within the "
                             f"model's num_layers ({config.num_layers})")
        self.padded_vocab_size = config.padded_vocab_size(self.tp_size)

        if pre_process:
            self.embedding = GPTEmbedding(config, self.padded_vocab_size, self.tp_group)
        self.layers = nn.ModuleList(ParallelTransformerLayer(config, self.tp_group, self.cp_group)
                                    for _ in range(self.num_layers))
        if post_process:
            self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.use_fused_kernels)
            if self.sequence_parallel:
                mark_sequence_parallel(self.final_layernorm.weight, self.final_layernorm.bias)
            if not pre_process:
                # this stage's own copy of the tied word embedding: zeros, then the first stage's
                # rows (the all-reduce below); the trainer keeps it equal by summing both gradients
                self.word_embeddings_weight = nn.Parameter(
                    torch.zeros(self.padded_vocab_size // self.tp_size, config.hidden_size))
                mark_partitioned(self.word_embeddings_weight, 0)
                self.word_embeddings_weight.shared = True  # a copy: counted once in the gradient norm
        if pre_process != post_process:
            self._initialize_word_embeddings()

    def _initialize_word_embeddings(self) -> None:
        """Megatron's start-up step: the last stage's zero copy + the first stage's rows, all-reduced over the
        embedding group (first and last stage), so both stages start with the same word embedding.

        A collective of the first and last pipeline stage; nothing to do without a split pipeline.
        """
        if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
            return
        weight = self.shared_embedding_weight()
        if (isinstance(self.tp_group, TPShape) or weight.device.type == "meta"  # shapes only, no data
                or (self.pre_process and not parallel_state.is_pipeline_first_stage())   # a stage of another
                or (self.post_process and not parallel_state.is_pipeline_last_stage())):  # layout than this rank's
            return
        group = parallel_state.get_embedding_group()
        if group is None or dist.get_world_size(group) == 1:
            return
        with torch.no_grad():
            buffer = weight.detach().to(parallel_state.get_device())  # NCCL reduces GPU tensors only
            dist.all_reduce(buffer, group=group)
            weight.copy_(buffer)

    def shared_embedding_weight(self) -> nn.Parameter:
        """The word-embedding weight used by this stage's embedding and/or LM head (this rank's rows)."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.word_embeddings_weight
        raise RuntimeError("this pipeline stage holds neither the embedding nor the LM head")

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.recompute_activations and torch.is_grad_enabled():
            if self.sequence_parallel:  # the recomputation must draw the per-rank stream's masks again
                return checkpoint(layer, x, use_reentrant=False,
                                  context_fn=lambda: checkpoint_rng_contexts(x.device))
            return checkpoint(layer, x, use_reentrant=False)  # keep the input, recompute the rest in backward
        return layer(x)

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, kv_cache=None, last_position_only: bool = False
                ) -> torch.Tensor:
        """See the class docstring; ``kv_cache`` and ``last_position_only`` serve generation.

        ``kv_cache`` (a :class:`lessons_pkg.inference.KVCache` of this stage)
        holds the keys and values of the positions already seen: ``inputs``
        are then only the NEW positions, numbered from ``kv_cache.length`` on
        (unless ``position_ids`` says otherwise), and the cache grows by
        ``s``. ``last_position_only`` applies the LM head to the last position
        only (``[b, 1, V/tp]``): generation needs no more, and the head is the
        costliest matmul of a short prompt.
        """
        if kv_cache is not None:
            return self._forward_cached(inputs, position_ids, kv_cache, last_position_only)
        if (self.sequence_parallel or self.cp_group is not None) and last_position_only:
            raise ValueError("last_position_only serves generation, which needs the model without sequence or "
                             "context parallelism")
        if self.pre_process:
            if inputs.is_floating_point():
                raise TypeError(f"the first stage takes input_ids [b, s] (integers), got {inputs.dtype} "
                                f"{tuple(inputs.shape)}")
            if position_ids is None and self.cp_group is not None:   # this rank's chunks of s = s_local x cp
                position_ids = local_positions_cp(inputs.size(1) * self.cp_size, self.cp_size, self.cp_rank,
                                                  inputs.device)                   # [1, s/cp]
            elif position_ids is None:
                position_ids = torch.arange(inputs.size(1), device=inputs.device).unsqueeze(0)  # [1, s]
            if self.sequence_parallel:
                check_sequence_parallel(self.tp_size, inputs.size(1))
            x = self.embedding(inputs, position_ids)                   # [b, s] -> [b, s, h] (SP: [b, s/tp, h])
        else:
            if inputs.dim() != 3:
                raise ValueError(f"a non-first stage takes hidden states [b, s, h], got {tuple(inputs.shape)}")
            x = inputs
        for layer in self.layers:
            x = self._layer(layer, x)                                  # [b, s, h]
        if not self.post_process:
            return x
        if last_position_only:
            x = x[:, -1:]                                              # [b, s, h] -> [b, 1, h]
        x = self.final_layernorm(x)
        if self.sequence_parallel:     # all-gather [b, s/tp, h] -> [b, s, h]; backward: reduce-scatter
            logits = linear_with_sequence_gather(x, self.shared_embedding_weight(), None, self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.tp_group)   # f: sum the head's input gradient
            logits = F.linear(x, self.shared_embedding_weight())          # [b, s, h] -> [b, s, V/tp]
        if labels is None:
            return logits
        return cross_entropy(logits.float(), labels, tp_group=self.tp_group)  # [b, s] (vocab-parallel when TP > 1)

    def _forward_cached(self, inputs: torch.Tensor, position_ids: torch.Tensor | None, kv_cache,
                        last_position_only: bool) -> torch.Tensor:
        """Inference only: the new positions through this stage, keys/values read from and added to the cache."""
        if self.sequence_parallel or self.cp_group is not None:
            raise ValueError("a key/value cache (generation) needs the whole sequence on every rank: build the "
                             "model without sequence or context parallelism for inference (the same weights)")
        s = inputs.size(1)
        if self.pre_process:
            if position_ids is None:                                   # the new tokens follow the cached ones
                position_ids = torch.arange(kv_cache.length, kv_cache.length + s, device=inputs.device).unsqueeze(0)
            x = self.embedding(inputs, position_ids)                   # [b, s] -> [b, s, h]
        else:
            x = inputs                                                 # [b, s, h] from the previous stage
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache.layer(i))                            # [b, s, h]; cache: this rank's heads
        kv_cache.advance(s)
        if not self.post_process:
            return x
        if last_position_only:
            x = x[:, -1:]                                              # [b, s, h] -> [b, 1, h]
        x = self.final_layernorm(x)
        return F.linear(x, self.shared_embedding_weight())            # [b, s, h] -> [b, s, V/tp]

    # -- master weights ------------------------------------------------------
    def global_layer_name(self, local_name: str) -> str:
        """``layers.0.mlp...`` of this stage -> ``layers.{layer_offset}.mlp...``; head copy -> embedding name."""
        if local_name.startswith("layers."):
            _, index, rest = local_name.split(".", 2)
            return f"layers.{int(index) + self.layer_offset}.{rest}"
        if local_name == "word_embeddings_weight":
            return "embedding.word_embeddings.weight"
        return local_name

    def load_master_state_dict(self, full_state_dict: dict[str, torch.Tensor]) -> None:
        """Load this rank's shard of this stage's layers from full-size (TP=1, unpadded vocab) weights."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                key = self.global_layer_name(name)
                if key not in full_state_dict:
                    raise KeyError(f"{key!r} (parameter {name!r} of this stage) is missing from the master state dict")
                param.copy_(shard_of(param, full_state_dict[key], self.tp_rank, self.tp_size))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's full-size weights (gathered over the tensor-parallel group, vocab padding removed).

        A collective: every rank of the tensor-parallel group must call it.
        """
        full = {self.global_layer_name(name): gather_full(param, self.tp_group)
                for name, param in self.named_parameters()}
        word = "embedding.word_embeddings.weight"
        if word in full:
            full[word] = full[word][: self.config.vocab_size].clone()  # drop the dummy tokens' rows
        return full
