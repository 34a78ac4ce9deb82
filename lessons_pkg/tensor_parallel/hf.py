"""Convert between our master state dict and ``transformers``' ``GPT2LMHeadModel``.

Two differences matter:

* GPT-2 uses ``Conv1D`` layers whose weight is ``[in, out]`` (``y = x W + b``);
  ours are ``nn.Linear``-style ``[out, in]``: every matrix is transposed.
* GPT-2's fused ``c_attn`` produces ``[q of all heads | k of all heads | v of all heads]``;
  our ``query_key_value`` produces ``[head 0: q k v | head 1: q k v | ...]`` so a
  contiguous slice of rows holds whole heads. The conversion permutes the rows.

The word embedding of the master state dict has the real vocabulary (no dummy
rows), like GPT-2's ``wte``; ``lm_head.weight`` is tied to it.
"""
from __future__ import annotations

import torch

from lessons_pkg.tensor_parallel.config import GPTConfig


def config_to_hf(config: GPTConfig, **overrides):
    """A ``transformers.GPT2Config`` describing the same network as ``config`` (GeLU tanh, pre-LN, tied head)."""
    from transformers import GPT2Config

    activation = "gelu_new" if config.gelu_approximate == "tanh" else "gelu"   # tanh form, or the exact erf
    kwargs = dict(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
        activation_function=activation, resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layernorm_epsilon,
        initializer_range=config.init_method_std, tie_word_embeddings=True,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,  # GPT-2's 50256 is the last id
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """Our :class:`GPTConfig` for a ``transformers.GPT2Config`` (GPT-2s with the tanh or the exact GeLU).

    ``gelu_new``, ``gelu_fast`` (what transformers' Megatron converter writes for
    Megatron's fused bias-GeLU) and ``gelu_pytorch_tanh`` are one function,
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, written three ways;
    ``gelu`` is the exact ``x Phi(x)`` (``gelu_approximate="none"``).
    """
    tanh_forms = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
    if hf_config.activation_function not in (*tanh_forms, "gelu"):
        raise ValueError(f"activation_function {hf_config.activation_function!r}: ParallelGPT has the GeLU only "
                         f"({', '.join(tanh_forms)} or the exact gelu)")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"n_inner ({hf_config.n_inner}) must be 4 x n_embd ({4 * hf_config.n_embd})")
    kwargs = dict(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.n_embd, num_layers=hf_config.n_layer,
        num_attention_heads=hf_config.n_head, max_position_embeddings=hf_config.n_positions,
        hidden_dropout=hf_config.resid_pdrop, attention_dropout=hf_config.attn_pdrop,
        layernorm_epsilon=hf_config.layer_norm_epsilon, init_method_std=hf_config.initializer_range,
        gelu_approximate="tanh" if hf_config.activation_function in tanh_forms else "none",
    )
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def _qkv_hf_to_ours(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows ``[3 (q,k,v), heads, head_dim, ...] -> [heads, 3, head_dim, ...]`` (weight ``[3h, h]`` or bias ``[3h]``)."""
    rest = w.shape[1:]
    return w.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(w.shape)


def _qkv_ours_to_hf(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(w.shape)


# (our name, GPT-2 name, is a Conv1D matrix to transpose)
_LAYER_MAP = [
    ("input_layernorm.weight", "ln_1.weight", False), ("input_layernorm.bias", "ln_1.bias", False),
    ("self_attention.query_key_value.weight", "attn.c_attn.weight", True),
    ("self_attention.query_key_value.bias", "attn.c_attn.bias", False),
    ("self_attention.dense.weight", "attn.c_proj.weight", True), ("self_attention.dense.bias", "attn.c_proj.bias", False),
    ("post_attention_layernorm.weight", "ln_2.weight", False), ("post_attention_layernorm.bias", "ln_2.bias", False),
    ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", True), ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", False),
    ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", True), ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", False),
]


def to_hf_state_dict(full: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our master state dict -> ``GPT2LMHeadModel.state_dict()`` (new tensors; the input is not changed)."""
    heads = config.num_attention_heads
    wte = full["embedding.word_embeddings.weight"][: config.vocab_size]
    hf = {"transformer.wte.weight": wte.clone(), "lm_head.weight": wte.clone(),
          "transformer.wpe.weight": full["embedding.position_embeddings.weight"].clone()}
    for i in range(config.num_layers):
        for ours, theirs, transpose in _LAYER_MAP:
            t = full[f"layers.{i}.{ours}"]
            if "query_key_value" in ours:
                t = _qkv_ours_to_hf(t, heads)
            hf[f"transformer.h.{i}.{theirs}"] = (t.t() if transpose else t).contiguous().clone()
    hf["transformer.ln_f.weight"] = full["final_layernorm.weight"].clone()
    hf["transformer.ln_f.bias"] = full["final_layernorm.bias"].clone()
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel.state_dict()`` (or a dict of its gradients) -> our master state dict.

    Linear in its input, so it converts gradients too. ``lm_head.weight`` is
    taken as tied to ``transformer.wte.weight`` and not read.
    """
    heads = config.num_attention_heads
    full = {"embedding.word_embeddings.weight": hf["transformer.wte.weight"].clone(),
            "embedding.position_embeddings.weight": hf["transformer.wpe.weight"].clone()}
    for i in range(config.num_layers):
        for ours, theirs, transpose in _LAYER_MAP:
            t = hf[f"transformer.h.{i}.{theirs}"]
            t = t.t() if transpose else t
            if "query_key_value" in ours:
                t = _qkv_hf_to_ours(t, heads)
            full[f"layers.{i}.{ours}"] = t.contiguous().clone()
    full["final_layernorm.weight"] = hf["transformer.ln_f.weight"].clone()
    full["final_layernorm.bias"] = hf["transformer.ln_f.bias"].clone()
    return full


def to_hf_model(full: dict[str, torch.Tensor], config: GPTConfig):
    """A ``GPT2LMHeadModel`` holding the weights of our master state dict (eval mode)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config_to_hf(config))
    model.load_state_dict(to_hf_state_dict(full, config))
    return model.eval()
