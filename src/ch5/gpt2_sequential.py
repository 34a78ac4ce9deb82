"""GPT-2 rebuilt as a flat sequence of layers, the form pipeline libraries cut into stages.

torchgpipe's ``GPipe`` and DeepSpeed's ``PipelineModule`` both see a model as a
list of layers where each layer takes one tensor and returns one tensor::

    token ids                [batch, seq]
    -> GPT2Embedding         token + position embeddings, dropout   [batch, seq, hidden]
    -> CausalGPT2Block x n   (transformers' GPT2Block)              [batch, seq, hidden]
    -> GPT2Head              final LayerNorm, LM head               [batch, seq, vocab]

Three traps wait when the blocks of ``GPT2LMHeadModel`` are called one by one:

1. ``GPT2Block.forward`` returns a tensor in transformers 5 (a tuple in 4.x).
   The old idiom ``block(x)[0]`` now takes the first *sample* of the batch and
   nothing fails loudly.
2. Causality. ``GPT2Model`` builds the causal mask and hands it to every block.
   A block called without a mask is causal only when its attention function
   applies ``is_causal`` itself (sdpa, flash attention); the eager attention
   then lets every token see the future. :class:`CausalGPT2Block` passes an
   explicit mask whenever the attention implementation needs one.
3. Tied weights. GPT-2's LM head *is* the token-embedding matrix, but the
   embedding lives on the first stage and the head on the last. torchgpipe
   refuses a parameter shared by two partitions, so for GPipe the head holds a
   copy and :func:`sync_tied_gradients` gives both copies the sum of their
   gradients: equal start + equal gradients = equal weights after every
   optimizer step (this is what Megatron-LM does between its first and last
   stage). DeepSpeed does the same for a ``TiedLayerSpec`` (see pipe_dream.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

# attention implementations that are causal when called with attention_mask=None
_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


class GPT2Embedding(nn.Module):
    """Token + position embeddings and dropout: ``[batch, seq]`` ids -> ``[batch, seq, hidden]``."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.size(1)
        if seq_len > self.wpe.num_embeddings:
            raise ValueError(f"sequence length ({seq_len}) exceeds n_positions ({self.wpe.num_embeddings})")
        positions = torch.arange(seq_len, device=input_ids.device)  # [seq]
        hidden = self.wte(input_ids) + self.wpe(positions)  # [batch, seq, hidden]
        return self.drop(hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head: ``[batch, seq, hidden] @ wte^T -> [batch, seq, vocab]``."""
        return F.linear(hidden, self.wte.weight)


class CausalGPT2Block(GPT2Block):
    """transformers' ``GPT2Block`` with a one-tensor interface that is causal on its own.

    ``[batch, seq, hidden] -> [batch, seq, hidden]``. The name contains
    ``GPT2Block`` so that DeepSpeed's ``partition_method="type:GPT2Block"`` finds it.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = None
        if self.attn.config._attn_implementation not in _CAUSAL_WITHOUT_MASK:
            mask = causal_mask(hidden_states.size(1), hidden_states.dtype, hidden_states.device)
        return super().forward(hidden_states, attention_mask=mask)  # a tensor in transformers 5


def causal_mask(seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask ``[1, 1, seq, seq]``: 0 on and below the diagonal, the dtype's minimum above."""
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[None, None]  # [1, 1, seq, seq], broadcast over batch and heads


class GPT2Head(nn.Module):
    """Final LayerNorm and LM head: ``[batch, seq, hidden] -> [batch, seq, vocab]``."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def sequential_from_hf(model: GPT2LMHeadModel) -> nn.Sequential:
    """Copy the weights of a ``GPT2LMHeadModel`` into ``Sequential(embedding, blocks..., head)``.

    The result owns its own tensors (the source model is left untouched, so
    it can serve as the single-process reference). The head's weight is a copy
    of the tied embedding matrix; keep the two equal with :func:`sync_tied_gradients`.
    """
    config = model.config
    embedding = GPT2Embedding(config)
    embedding.wte.load_state_dict(model.transformer.wte.state_dict())
    embedding.wpe.load_state_dict(model.transformer.wpe.state_dict())
    blocks = []
    for i, source in enumerate(model.transformer.h):
        block = CausalGPT2Block(config, layer_idx=i)
        block.load_state_dict(source.state_dict())
        blocks.append(block)
    head = GPT2Head(config)
    head.ln_f.load_state_dict(model.transformer.ln_f.state_dict())
    head.lm_head.weight.data.copy_(model.lm_head.weight.data)  # == transformer.wte.weight (tied)
    seq = nn.Sequential(embedding, *blocks, head)
    return seq.to(model.device).train(model.training)


def tied_pair(seq: nn.Sequential) -> tuple[nn.Parameter, nn.Parameter]:
    """The two copies of GPT-2's tied matrix: ``(embedding.wte.weight, head.lm_head.weight)``."""
    return seq[0].wte.weight, seq[-1].lm_head.weight


@torch.no_grad()
def sync_tied_gradients(embedding_weight: nn.Parameter, head_weight: nn.Parameter) -> None:
    """Give both copies of the tied matrix the sum of their gradients (the gradient of the tied weight).

    The copies may sit on different devices (first and last pipeline stage).
    """
    total = embedding_weight.grad + head_weight.grad.to(embedding_weight.device)
    embedding_weight.grad.copy_(total)
    head_weight.grad.copy_(total.to(head_weight.device))


def hf_parameter_names(model: GPT2LMHeadModel) -> Iterator[tuple[str, str]]:
    """Pairs ``(name in the Sequential, name in model)`` for every parameter of the Sequential.

    ``lm_head.weight`` maps to ``transformer.wte.weight``: in the reference they
    are one tensor, whose gradient collects both uses.
    """
    n_layer = len(model.transformer.h)
    yield "0.wte.weight", "transformer.wte.weight"
    yield "0.wpe.weight", "transformer.wpe.weight"
    for i, block in enumerate(model.transformer.h):
        for name, _ in block.named_parameters():
            yield f"{i + 1}.{name}", f"transformer.h.{i}.{name}"
    yield f"{n_layer + 1}.ln_f.weight", "transformer.ln_f.weight"
    yield f"{n_layer + 1}.ln_f.bias", "transformer.ln_f.bias"
    yield f"{n_layer + 1}.lm_head.weight", "transformer.wte.weight"


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position t predicts token t+1 (mean over ``batch * (seq-1)`` tokens)."""
    logits = logits[:, :-1, :]  # [batch, seq-1, vocab]
    labels = input_ids[:, 1:].to(logits.device)  # [batch, seq-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def tiny_config(vocab_size: int, n_positions: int = 128, n_embd: int = 64, n_layer: int = 4, n_head: int = 4,
                dropout: float = 0.0) -> GPT2Config:
    """A small GPT-2 configuration for CPU runs (GPT-2 small is n_embd 768, n_layer 12, n_head 12).

    The attention implementation is set to PyTorch's sdpa here, because blocks built
    straight from a config (as DeepSpeed's LayerSpec does) do not go through the model
    constructor that would otherwise choose it.
    """
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) is not divisible by n_head ({n_head})")
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, attn_implementation="sdpa",
    )


def load_gpt2(model_name: str | None, fallback: GPT2Config) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel.from_pretrained(model_name)``, or with ``model_name=None`` a fresh model of ``fallback``.

    A model asked for by name that cannot be loaded (no network, unknown name)
    is a ``RuntimeError`` naming it, never a silent substitute.
    """
    if model_name:
        try:
            return GPT2LMHeadModel.from_pretrained(model_name)
        except OSError as e:  # no network / unknown name
            raise RuntimeError(f"--model-name {model_name}: could not load it ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0]}); leave --model-name out for a fresh small "
                               "GPT-2") from None
    return GPT2LMHeadModel(fallback)


@contextlib.contextmanager
def dropout_disabled(*modules: nn.Module):
    """Set every ``nn.Dropout`` in ``modules`` to p=0 for the duration (GPT-2's attention reads ``attn_dropout.p``).

    Used when comparing a pipeline with the reference: with dropout on, the two
    would draw different random masks and could not agree.
    """
    saved = [(m, m.p) for module in modules for m in module.modules() if isinstance(m, nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p
