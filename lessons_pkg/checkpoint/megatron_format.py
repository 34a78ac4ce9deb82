"""What is inside a Megatron-LM checkpoint file (the legacy GPT layout), and reading it safely.

One ``model_optim_rng.pt`` per (tensor, pipeline) rank holds::

    {
      "model": {                                          # "model0", "model1", ... with virtual pipeline chunks
        "language_model": {
          "embedding": {                                  # first stage only
            "word_embeddings": {"weight": [V_pad/tp, h]},
            "position_embeddings": {"weight": [max_pos, h]},
          },
          "encoder": {                                    # "transformer" in checkpoints before mid-2021
            "layers.0.input_layernorm.weight": [h],       # N = the STAGE-LOCAL layer index
            "layers.0.self_attention.query_key_value.weight": [3h/tp, h],   # "attention" in older ones
            ...,
            "final_layernorm.weight": [h],                # last stage only
          },
        },
        "word_embeddings_for_head": {"weight": [V_pad/tp, h]},   # last stage, when it is not also the first
      },
      "checkpoint_version": 3.0,
      "iteration": 5000,
      "args": argparse.Namespace(tensor_model_parallel_size=..., num_layers=..., padded_vocab_size=..., ...),
      "optimizer": {...}, "opt_param_scheduler": {...}, "rng_state": [...],
    }

``checkpoint_version`` says how the rows of ``query_key_value`` are ordered
within each tensor rank's slice (``np`` heads, ``hn`` = head size)::

    < 1.0   [3, np, hn]    all q rows, then all k, then all v
    1.0     [np, hn, 3]    q k v interleaved row by row
    >= 2.0  [np, 3, hn]    head by head, each q k v   (ours; Megatron writes 3.0)

Our ``ParallelGPT`` names its parameters as Megatron's ``encoder`` does, so
converting is a matter of nesting: :func:`to_megatron` and :func:`from_megatron`.

Files are read with ``torch.load(weights_only=True)``: only tensors, numbers,
strings and containers unpickle, plus the allowlist :data:`SAFE_GLOBALS`
(``argparse.Namespace`` for Megatron-LM's ``args``, ``types.SimpleNamespace``
for the ``args`` of transformers' Megatron converter, both plain attribute bags
whose unpickling runs no code, and the numpy pieces Megatron's RNG states are
made of). Anything else is an error naming the class, never a silent
``weights_only=False``. :func:`read_args` turns any of those ``args`` (or a
dict) into an ``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
import re
import types

import torch

from lessons_pkg.errors import CheckpointError

CHECKPOINT_VERSION = 3.0
WORD = "embedding.word_embeddings.weight"
POSITION = "embedding.position_embeddings.weight"
HEAD = "word_embeddings_weight"           # ParallelGPT's copy of the tied embedding on a last stage


def _numpy_globals() -> list:
    """numpy's array-unpickling helpers (Megatron saves ``np.random.get_state()`` in ``rng_state``)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    out = [np.ndarray, np.dtype]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    out.append(multiarray._reconstruct)
    out += [getattr(np.dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(np, "dtypes")
            and hasattr(np.dtypes, n)]
    return out


SAFE_GLOBALS = [argparse.Namespace, types.SimpleNamespace, *_numpy_globals()]
ARGS_KINDS = (argparse.Namespace, types.SimpleNamespace, dict)


def read_args(args, where: str) -> argparse.Namespace:
    """A checkpoint's saved ``args`` (``argparse.Namespace``, ``types.SimpleNamespace`` or dict) as a Namespace."""
    if isinstance(args, dict):
        bad = [k for k in args if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"{where}: its args dict has keys that are not names: {bad[:5]}")
        return argparse.Namespace(**args)
    if isinstance(args, (argparse.Namespace, types.SimpleNamespace)):
        return argparse.Namespace(**vars(args))
    raise CheckpointError(f"{where}: its 'args' is a {type(args).__module__}.{type(args).__qualname__}; a Megatron "
                     "checkpoint stores them as an argparse.Namespace (Megatron-LM), a types.SimpleNamespace "
                     "(transformers' converter) or a dict")


def safe_load(path: str, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` with the allowlist; ``mmap`` maps tensors lazily from the file."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and, when known, the refused classes
        refused = []
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
            refused = [g for g in found if g not in allowed]
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all
            pass
        if refused:
            raise CheckpointError(f"cannot read checkpoint file {path}: it pickles {', '.join(refused)}, outside the "
                             "allowlist of lessons_pkg.checkpoint.megatron_format.SAFE_GLOBALS (unpickling it "
                             "could run arbitrary code; we never load with weights_only=False)") from e
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(e).__name__}: {str(e)[:500]}") from e


# --- our stage state dict <-> Megatron's nested dict ------------------------------------------------
def to_megatron(stage: dict[str, torch.Tensor]) -> dict:
    """A ``ParallelGPT`` stage's ``state_dict()`` (stage-local layer numbers) -> Megatron's ``model`` dict."""
    language_model: dict = {}
    embedding = {}
    if WORD in stage:
        embedding["word_embeddings"] = {"weight": stage[WORD]}
    if POSITION in stage:
        embedding["position_embeddings"] = {"weight": stage[POSITION]}
    if embedding:
        language_model["embedding"] = embedding
    language_model["encoder"] = {k: v for k, v in stage.items()
                                 if k.startswith("layers.") or k.startswith("final_layernorm.")}
    model = {"language_model": language_model}
    if HEAD in stage:
        model["word_embeddings_for_head"] = {"weight": stage[HEAD]}
    unknown = set(stage) - {WORD, POSITION, HEAD} - set(language_model["encoder"])
    if unknown:
        raise ValueError(f"no place in Megatron's layout for {sorted(unknown)}")
    return model


def _qkv_to_current(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """Rows of one tensor rank's ``query_key_value`` (weight or bias) from ``version``'s order to ``[np, 3, hn]``."""
    rest = t.shape[1:]
    if version < 1.0:    # [3, np, hn]
        return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()
    if version < 2.0:    # [np, hn, 3]
        return t.reshape(heads, -1, 3, *rest).transpose(1, 2).reshape(t.shape).contiguous()
    return t


_OLD_NAMES = [(re.compile(r"\.attention\."), ".self_attention.")]


def from_megatron(model: dict, checkpoint_version: float = CHECKPOINT_VERSION,
                  heads_per_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Megatron's ``model`` dict (any version) -> a ``ParallelGPT`` stage state dict (stage-local numbers).

    Older names are renamed (``transformer`` -> ``encoder``, ``attention`` ->
    ``self_attention``); the QKV rows of ``checkpoint_version`` < 2 are
    reordered, which needs ``heads_per_rank`` (heads / tensor-parallel size).
    """
    if "language_model" not in model and model and all(isinstance(v, torch.Tensor) for v in model.values()) \
            and any(k.startswith("layers.") for k in model):
        return dict(model)  # the flat ParallelGPT state dict that earlier versions of this course saved
    if "language_model" not in model:
        raise CheckpointError(f"not a Megatron GPT model: no 'language_model' among {sorted(model)[:8]}")
    lm = model["language_model"]
    out: dict[str, torch.Tensor] = {}
    embedding = lm.get("embedding")
    if embedding is not None:
        out[WORD] = embedding["word_embeddings"]["weight"]
        if "position_embeddings" in embedding:
            out[POSITION] = embedding["position_embeddings"]["weight"]
    encoder = lm.get("encoder", lm.get("transformer"))
    if encoder is None:
        raise CheckpointError(f"Megatron model has no 'encoder' (or older 'transformer'): keys {sorted(lm)}")
    for key, value in encoder.items():
        for pattern, new in _OLD_NAMES:
            key = pattern.sub(new, key)
        if key.endswith(("query_key_value.weight", "query_key_value.bias")) and checkpoint_version < 2.0:
            if heads_per_rank is None:
                raise ValueError(f"checkpoint_version {checkpoint_version} needs heads_per_rank to reorder QKV rows")
            value = _qkv_to_current(value, checkpoint_version, heads_per_rank)
        out[key] = value
    if "word_embeddings_for_head" in model:
        out[HEAD] = model["word_embeddings_for_head"]["weight"]
    return out


def model_keys(state: dict) -> list[str]:
    """``["model"]`` or ``["model0", "model1", ...]``: the model chunks a checkpoint file holds, in order."""
    if "model" in state:
        return ["model"]
    chunks = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not chunks:
        raise CheckpointError(f"checkpoint holds no 'model' nor 'model0', 'model1', ...: keys {sorted(state)}")
    return chunks


# --- arguments -------------------------------------------------------------------------------------
def megatron_args(args, **updates) -> argparse.Namespace:
    """An ``argparse.Namespace`` of Megatron's argument names (what Megatron's loaders read from ``args``).

    Starts from ``args`` (ours already use Megatron's names) and fills the
    fields Megatron-LM's checkpoint loader and ``transformers``' converter
    expect for a learned-position, LayerNorm, GeLU, biased, tied GPT-2.
    """
    values = dict(vars(read_args(args, "megatron_args")))
    values.update(updates)
    # transformers' converter reads the real vocabulary from orig_vocab_size: keep it equal to ours
    values["orig_vocab_size"] = values.get("true_vocab_size")
    h = values["hidden_size"]
    defaults = dict(
        ffn_hidden_size=4 * h, kv_channels=h // values["num_attention_heads"], seq_length=values.get(
            "max_position_embeddings"), encoder_seq_length=values.get("seq_length"),
        position_embedding_type="learned_absolute", add_position_embedding=True,
        use_rotary_position_embeddings=False, normalization="LayerNorm", apply_layernorm_1p=False,
        layernorm_epsilon=1e-5, add_bias_linear=True, add_qkv_bias=True, swiglu=False, openai_gelu=False,
        bias_gelu_fusion=True, untie_embeddings_and_output_weights=False, num_query_groups=None,
        group_query_attention=False, params_dtype=torch.float32, model_type="GPT", tokenizer_type="GPT2BPETokenizer",
        virtual_pipeline_model_parallel_size=None, make_vocab_size_divisible_by=128, consumed_train_samples=0,
        consumed_valid_samples=0, data_parallel_size=1, num_layers_per_virtual_pipeline_stage=None,
    )
    for k, v in defaults.items():
        if values.get(k) is None:
            values[k] = v
    return argparse.Namespace(**values)


def gelu_approximate(args) -> str:
    """F.gelu's ``approximate=`` for the GeLU a Megatron model's saved arguments describe.

    Megatron-LM's fused ``bias_gelu`` is the tanh formula, and fusion is the default
    (``--no-bias-gelu-fusion`` turns it off). megatron-core models
    (``use_mcore_models``, or ``use_legacy_models`` False) read nothing else: fused
    means tanh, unfused calls the exact ``F.gelu``. The legacy ``ParallelMLP``
    also has ``--openai-gelu`` (the tanh formula) and ``--onnx-safe`` (the exact
    erf); whether ``onnx_safe`` overrode the fusion changed between versions (in
    2023 it did, before it did not), so that pair is refused rather than guessed.
    """
    def get(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    fused = get("bias_gelu_fusion", True) is not False
    if get("use_mcore_models", False) or get("use_legacy_models", True) is False:
        return "tanh" if fused else "none"
    if get("openai_gelu", False):
        return "tanh"
    if get("onnx_safe", False):
        if fused:
            raise CheckpointError("the saved args set both onnx_safe and bias_gelu_fusion: Megatron-LM versions "
                                  "disagree on which GeLU that ran (exact erf from 2023 on, the fused tanh before)")
        return "none"
    return "tanh" if fused else "none"


def check_supported(args: argparse.Namespace, where: str) -> None:
    """Refuse, by name, Megatron models that are not the GPT-2 architecture ParallelGPT implements."""
    def get(name, default=None):
        return getattr(args, name, default)

    problems = []
    if get("position_embedding_type", "learned_absolute") != "learned_absolute" or get("use_rotary_position_embeddings"):
        problems.append(f"position_embedding_type {get('position_embedding_type')!r} (only learned_absolute)")
    if str(get("normalization", "LayerNorm")) != "LayerNorm" or get("apply_layernorm_1p"):
        problems.append(f"normalization {get('normalization')!r} (only LayerNorm)")
    if get("swiglu"):
        problems.append("swiglu (only GeLU)")
    for other in ("squared_relu", "quick_geglu"):
        if get(other):
            problems.append(f"{other} (only GeLU)")
    if get("apply_residual_connection_post_layernorm"):
        problems.append("apply_residual_connection_post_layernorm (the residual must skip the LayerNorm, as in GPT-2)")
    if get("untie_embeddings_and_output_weights"):
        problems.append("untie_embeddings_and_output_weights (the head must be tied)")
    if get("add_bias_linear", True) is False:
        problems.append("add_bias_linear False (linear layers need biases)")
    if get("num_query_groups") not in (None, get("num_attention_heads")) and get("group_query_attention"):
        problems.append(f"num_query_groups {get('num_query_groups')} (grouped-query attention)")
    if get("ffn_hidden_size") not in (None, 4 * get("hidden_size", 0)):
        problems.append(f"ffn_hidden_size {get('ffn_hidden_size')} (must be 4 x hidden_size = {4 * get('hidden_size', 0)})")
    if problems:
        raise CheckpointError(f"{where}: this Megatron model is not a GPT-2 that ParallelGPT can hold: " + "; ".join(problems))
