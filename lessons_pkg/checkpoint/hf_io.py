"""``transformers`` GPT-2 folders: write one from our weights, read one into our weights.

A folder is what ``GPT2LMHeadModel.save_pretrained`` writes and
``from_pretrained`` reads: ``config.json`` (a ``GPT2Config``),
``model.safetensors`` (or the older ``pytorch_model.bin``) and, when we know
the tokenizer, GPT-2's ``vocab.json``/``merges.txt`` (plus the
``tokenizer_config.json`` that ``AutoTokenizer`` needs). The tensors are
converted by :mod:`lessons_pkg.tensor_parallel.hf` (Conv1D transposes, QKV rows
head by head <-> q|k|v).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from lessons_pkg.errors import CheckpointError
from lessons_pkg.tensor_parallel.config import GPTConfig
from lessons_pkg.tensor_parallel.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict


def save_hf_folder(folder: str, state_dict: dict[str, torch.Tensor], config: GPTConfig,
                   vocab_file: str | None = None, merge_file: str | None = None) -> None:
    """Write a ``GPT2LMHeadModel`` folder holding our master weights (and the tokenizer files when given)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    hf_config = config_to_hf(config)
    if vocab_file:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        eod = vocab.get("<|endoftext|>")
        if eod is not None:
            hf_config.bos_token_id = hf_config.eos_token_id = eod
    hf_config.architectures = ["GPT2LMHeadModel"]
    hf_config.save_pretrained(folder)
    tensors = to_hf_state_dict(state_dict, config)
    tensors.pop("lm_head.weight")  # tied to transformer.wte.weight: stored once, as transformers does
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    if vocab_file and merge_file:
        shutil.copyfile(vocab_file, os.path.join(folder, "vocab.json"))
        shutil.copyfile(merge_file, os.path.join(folder, "merges.txt"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.max_position_embeddings,
                       "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "add_prefix_space": False}, f, indent=2)


def load_hf_folder(folder: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Read a GPT-2 folder (safetensors or ``pytorch_model.bin``) into ``(config, master state dict)``."""
    from transformers import GPT2Config

    hf_config = GPT2Config.from_pretrained(folder)
    if hf_config.model_type != "gpt2":
        raise CheckpointError(f"{folder}: model_type {hf_config.model_type!r}, only GPT-2 folders can be imported")
    config = config_from_hf(hf_config)
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file

        tensors = load_file(path)
    else:
        tensors = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    # the hub's gpt2 stores names without the "transformer." prefix; save_pretrained writes them with it
    tensors = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    needed = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise CheckpointError(f"{folder}: not a GPT-2 checkpoint, missing {missing}")
    if tensors["transformer.wte.weight"].shape != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"{folder}: transformer.wte.weight has shape {tuple(tensors['transformer.wte.weight'].shape)}, "
                         f"config says vocab_size {config.vocab_size} x n_embd {config.hidden_size}")
    return config, from_hf_state_dict({k: v.float() for k, v in tensors.items()}, config)
