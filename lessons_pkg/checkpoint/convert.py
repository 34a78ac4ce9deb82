"""Whole conversions, written atomically: Megatron <-> Megatron (another layout), Megatron <-> transformers.

Used by ``src/ch6/checkpoint_util.py``. Every conversion checks its input and
the target layout before it writes anything, writes into a temporary sibling
folder, and only then renames it to ``--save-dir`` (tracker written last
inside it), so a failed or interrupted conversion never leaves a half-written
checkpoint under the requested name, and an existing checkpoint is replaced
only with ``overwrite=True``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError

from lessons_pkg.checkpoint import megatron_format as mf
from lessons_pkg.checkpoint.layout import TRACKER, checkpoint_dir, iteration_dirname
from lessons_pkg.checkpoint.reshard import (Layout, SourceCheckpoint, VocabHints, build_rank_state,
                                            read_full_checkpoint)
from lessons_pkg.checkpoint.vocab import VocabSize
from lessons_pkg.errors import CheckpointError, OutputError, describe
from lessons_pkg.tensor_parallel.config import GPTConfig


@dataclass
class InMemorySource:
    """Full-size weights (e.g. imported from ``transformers``) offered with :class:`SourceCheckpoint`'s interface."""
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    args: argparse.Namespace
    iteration: int = 0
    consumed_train_samples: int = 0
    scheduler: dict | None = None
    layout: Layout = field(default_factory=Layout)

    @property
    def vocab(self) -> VocabSize:
        return VocabSize(self.config.vocab_size, self.config.vocab_size, "the imported model")

    def full(self, key: str) -> torch.Tensor:
        return self.state_dict[key]

    def has_optimizer(self) -> bool:
        return False

    def release(self, force: bool = False) -> None:
        pass


def megatron_args_for(config: GPTConfig, **extra) -> argparse.Namespace:
    """Megatron arguments describing ``config`` (for weights that come from outside Megatron)."""
    return mf.megatron_args(dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by, init_method_std=config.init_method_std,
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
        layernorm_epsilon=config.layernorm_epsilon, true_vocab_size=config.vocab_size,
        bias_gelu_fusion=config.gelu_approximate == "tanh", **extra))


def _prepare_output(save_dir: str, overwrite: bool) -> str:
    """Refuse an existing non-empty ``save_dir`` unless ``overwrite``; return a fresh temporary sibling folder."""
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)) and not overwrite:
        raise CheckpointError(f"--save-dir {save_dir} exists and is not empty: choose another folder or pass "
                              "--overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(save_dir))
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(save_dir))}.tmp-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:  # read-only, a file where a folder goes
        raise _write_failed(save_dir, e, tmp) from None
    return tmp


def _write_failed(save_dir: str, error: Exception, tmp: str | None = None) -> OutputError:
    """The error for a conversion whose writing failed; the temporary folder it wrote to is named as --save-dir."""
    reason = describe(error) or str(error)
    if tmp:
        reason = reason.replace(tmp, save_dir)
    kept = "the folder that was there is unchanged" if os.path.exists(save_dir) else "nothing was written"
    return OutputError(f"could not write the conversion to --save-dir {save_dir}: {reason}; {kept}")


def _publish(tmp: str, save_dir: str) -> None:
    """Move the finished temporary folder to ``save_dir`` (replacing an old one only now)."""
    old = None
    if os.path.exists(save_dir):
        old = save_dir.rstrip("/") + f".old-{os.getpid()}"
        os.replace(save_dir, old)
    try:
        os.replace(tmp, save_dir)
    except OSError:
        if old:
            os.replace(old, save_dir)  # the old folder back where it was
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _tokenizer_files(root: str, args, given: tuple[str | None, str | None] = (None, None)
                     ) -> tuple[str | None, str | None]:
    """The tokenizer to ship with a conversion: the one given, the source folder's, or the one the args name."""
    for v, m in (given, (os.path.join(root, "vocab.json"), os.path.join(root, "merges.txt")),
                 (getattr(args, "vocab_file", None), getattr(args, "merge_file", None))):
        if v and m and os.path.isfile(v) and os.path.isfile(m):
            return v, m
    return None, None


def describe_vocab(vocab: VocabSize) -> str:
    """One line on the vocabulary a conversion keeps."""
    if vocab.true is None:
        return (f" > the checkpoint records no real vocabulary size (only padded_vocab_size {vocab.padded}): "
                f"keeping all {vocab.padded} rows; pass --true-vocab-size or --vocab-file to drop the padding")
    return f" > vocabulary: {vocab.true} tokens (from {vocab.source}), padded to {vocab.padded} in the source"


def write_megatron(src, save_dir: str, target: Layout, with_optim: bool = True, overwrite: bool = False,
                   release: bool = False, tokenizer: tuple[str | None, str | None] = (None, None),
                   log=print, progress: bool = True) -> dict:
    """Write ``src`` (a :class:`SourceCheckpoint` or :class:`InMemorySource`) at ``target``; return a summary."""
    from tqdm import tqdm

    target.check(src.config)
    tmp = _prepare_output(save_dir, overwrite)
    start = time.perf_counter()
    iteration = None if release else src.iteration
    summary = {"files": {}, "parameters": {}}
    try:
        ranks = [(t, p) for p in range(target.pp) for t in range(target.tp)]
        bar = tqdm(ranks, desc="writing shards", unit="shard", disable=not progress)
        for t, p in bar:
            on_layer = (lambda g: log(f" > sending transformer layer {g}")) if t == 0 else None  # Megatron's log
            state = build_rank_state(src, target, t, p, with_optim=with_optim,
                                     args_updates=dict(iteration=iteration or 0), on_layer=on_layer)
            if release:
                state["iteration"] = 0
            n = sum(v.numel() for key in mf.model_keys(state)
                    for v in mf.from_megatron(state[key]).values())
            log(f" > number of parameters on (tensor, pipeline) model parallel rank ({t}, {p}): {n}")
            folder = checkpoint_dir(tmp, iteration, t, p, target.pp)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "model_optim_rng.pt")
            from lessons_pkg.training.checkpointing import save_atomic

            save_atomic(state, path)
            summary["files"][os.path.relpath(path, tmp)] = os.path.getsize(path)
            summary["parameters"][(t, p)] = n
            del state
        for f, name in zip(tokenizer, ("vocab.json", "merges.txt")):
            if f:
                shutil.copyfile(f, os.path.join(tmp, name))
        from lessons_pkg.training.checkpointing import write_text_atomic

        write_text_atomic(os.path.join(tmp, TRACKER), "release" if release else str(iteration))
        _publish(tmp, save_dir)
    except (OSError, OutputError) as e:  # a full disk, a read-only folder: name --save-dir, leave nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(save_dir, e, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - start
    summary["iteration_dir"] = iteration_dirname(iteration)
    return summary


def megatron_to_megatron(load_dir: str, save_dir: str, target: Layout, with_optim: bool = True,
                         overwrite: bool = False, vocab: VocabHints = VocabHints(), log=print,
                         progress: bool = True, tokenizer: tuple[str | None, str | None] = (None, None)) -> dict:
    src = SourceCheckpoint.open(load_dir, vocab)
    target.check(src.config)
    log(f"loaded {load_dir}: iteration {src.iteration}, TP={src.layout.tp} x PP={src.layout.pp} x "
        f"{src.layout.vp} chunks, {src.config.num_layers} layers, hidden {src.config.hidden_size}, "
        f"vocabulary {src.config.vocab_size} (padded {src.padded_vocab_size})")
    log(describe_vocab(src.vocab))
    if with_optim and not src.has_optimizer():
        log(" > the source holds no optimizer state we can reshard: writing weights (and scheduler) only")
    log(f"saving at TP={target.tp} x PP={target.pp} x {target.vp} chunks to {save_dir}")
    return write_megatron(src, save_dir, target, with_optim, overwrite, release=src.files.iteration is None,
                          tokenizer=_tokenizer_files(load_dir, src.args, tokenizer), log=log, progress=progress)


def megatron_to_hf(load_dir: str, save_dir: str, overwrite: bool = False, vocab: VocabHints = VocabHints(),
                   log=print, tokenizer: tuple[str | None, str | None] = (None, None)) -> dict:
    from lessons_pkg.checkpoint.hf_io import save_hf_folder

    full = read_full_checkpoint(load_dir, vocab)
    log(describe_vocab(full.vocab))
    tmp = _prepare_output(save_dir, overwrite)
    try:
        vocab_file, merge_file = _tokenizer_files(load_dir, full.args, tokenizer)
        save_hf_folder(tmp, full.state_dict, full.config, vocab_file, merge_file)
        _publish(tmp, save_dir)
    except (OSError, OutputError, SafetensorError) as e:  # a full disk, a read-only folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(save_dir, e, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"saved a transformers GPT-2 folder to {save_dir} (tokenizer: {'yes' if vocab_file else 'not known'})")
    return {"files": {n: os.path.getsize(os.path.join(save_dir, n)) for n in sorted(os.listdir(save_dir))}}


def hf_to_megatron(load_dir: str, save_dir: str, target: Layout, overwrite: bool = False, log=print,
                   progress: bool = True) -> dict:
    """A ``transformers`` GPT-2 folder (or hub name, with network) -> a ``release`` Megatron checkpoint."""
    from lessons_pkg.checkpoint.hf_io import load_hf_folder

    folder = load_dir
    if not os.path.isdir(load_dir):
        folder = _download_hf(load_dir)
    config, state_dict = load_hf_folder(folder)
    vocab, merges = _tokenizer_files(folder, None)
    args = megatron_args_for(config, tensor_model_parallel_size=target.tp, pipeline_model_parallel_size=target.pp,
                             vocab_file=os.path.join(os.path.abspath(save_dir), "vocab.json") if vocab else None,
                             merge_file=os.path.join(os.path.abspath(save_dir), "merges.txt") if merges else None)
    log(f"loaded transformers GPT-2 {load_dir}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, vocabulary {config.vocab_size}")
    src = InMemorySource(config, state_dict, args)
    return write_megatron(src, save_dir, target, with_optim=False, overwrite=overwrite, release=True,
                          tokenizer=(vocab, merges), log=log, progress=progress)


def _download_hf(name: str) -> str:
    """A hub model name (e.g. ``gpt2``) -> its local snapshot folder; needs network."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "vocab.json", "merges.txt"])
    except Exception as e:  # noqa: BLE001 - offline, unknown name, ...
        raise CheckpointError(f"--load-dir {name!r} is not a local folder and could not be downloaded from the "
                                f"Hugging Face hub ({type(e).__name__}: {e})") from e


def verify(load_dir: str, save_dir: str, loader: str, saver: str, vocab: VocabHints = VocabHints(),
           log=print) -> bool:
    """Check the output holds the same model as the input: every tensor (bit for bit), or logits for ``transformers``.

    Megatron -> Megatron and HF -> Megatron: both sides glued to full size and compared with
    ``torch.equal`` (resharding copies, it computes nothing). Megatron -> HF: ``GPT2LMHeadModel``'s
    logits against ours on random tokens, within 1e-5 (float32, another summation order).
    """
    from lessons_pkg.checkpoint.hf_io import load_hf_folder

    def full(path, kind):
        if kind == "hf":
            return load_hf_folder(path if os.path.isdir(path) else _download_hf(path))
        c = read_full_checkpoint(path, vocab)
        return c.config, c.state_dict

    if saver == "megatron":
        _, a = full(load_dir, loader)
        _, b = full(save_dir, "megatron")
        ok = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        log(f"verified: every tensor of {save_dir} equals {load_dir}'s, bit for bit: {ok}")
        return ok
    from transformers import GPT2LMHeadModel

    from lessons_pkg.checkpoint.pretrained import Pretrained, build_stage

    config, state = full(load_dir, loader)
    ours = build_stage(Pretrained(config, state))
    hf = GPT2LMHeadModel.from_pretrained(save_dir).eval()
    x = torch.randint(0, config.vocab_size, (2, min(32, config.max_position_embeddings)),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (hf(x).logits - ours(x)[..., : config.vocab_size]).abs().max().item()
    ok = err < 1e-5
    log(f"verified: transformers' logits equal ours within 1e-5 (max difference {err:.1e}): {ok}")
    return ok
