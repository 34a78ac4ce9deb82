"""Resharding: read a checkpoint of one TP x PP (x virtual) layout, build the files of another.

Every tensor of the model is one of three kinds (Megatron's layers)::

    column-parallel  query_key_value, dense_h_to_4h (weight and bias), word embedding: rows split   (dim 0)
    row-parallel     self_attention.dense, dense_4h_to_h (weight only):                 columns split (dim 1)
    replicated       LayerNorms, row-parallel biases, position embedding:               equal on every rank

so merging glues the tensor ranks' slices along the partition dim (checking
that replicated tensors agree), and splitting cuts the full tensor again.
QKV needs nothing special because every layout stores it head by head
(``[np, 3, hn]`` rows, checkpoint_version 3.0): a contiguous slice of rows is a
set of whole heads. The word embedding is padded with dummy rows to a multiple
of ``make_vocab_size_divisible_by x tp``; the real vocabulary size comes from
the saved args, the command line or a tokenizer (:mod:`lessons_pkg.checkpoint.vocab`),
so we keep the real rows, keep as many of the source's dummy rows as the
target has room for, and zero-fill the rest: the real tokens' logits never
change, and a layout with the same padded size round-trips bit for bit. When
nothing tells the real size, every padded row is kept as if it were a token.

Pipeline stages only regroup layers: global layer ``g`` lives on virtual stage
``g // layers_per_stage``, which is chunk ``stage // pp`` of pipeline rank
``stage % pp`` (Megatron's round-robin), under the stage-local name
``layers.{g % layers_per_stage}``. The last stage, when it is not the first,
also holds ``word_embeddings_for_head``, a copy of the word embedding.

Memory: :class:`SourceCheckpoint` maps the source files (``torch.load(mmap=True)``)
and re-opens them per layer, so building one target shard holds that shard
plus one layer of the source, not the whole model at every layout (Megatron's
``checkpoint_util.py`` loads every source rank's model at once).

The optimizer travels too (Megatron's tool drops it): Adam's ``exp_avg`` and
``exp_avg_sq`` have the shape of their parameter, so they are resharded
exactly like the weights; ZeRO-1 slices (``distrib_optim_dp_rank_*.pt``) are
glued back per parameter first. The target always gets the plain per-parameter
form, which loads into the plain optimizer or ZeRO-1 at any data-parallel size.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from lessons_pkg.checkpoint import megatron_format as mf
from lessons_pkg.checkpoint.layout import CheckpointFiles, find_checkpoint
from lessons_pkg.checkpoint.vocab import VocabSize, resolve_vocab_size, vocab_file_size
from lessons_pkg.errors import CheckpointError
from lessons_pkg.tensor_parallel.config import GPTConfig
from lessons_pkg.tensor_parallel.utils import vocab_size_with_padding

STREAM_BYTES = 256 * 2**20
_COLUMN = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias")
_ROW = ("self_attention.dense.weight", "dense_4h_to_h.weight")


def partition_dim(key: str) -> int | None:
    """0 (rows split), 1 (columns split) or None (replicated) for a master-state-dict key."""
    if key in (mf.WORD, mf.HEAD) or key.endswith(_COLUMN):
        return 0
    if key.endswith(_ROW):
        return 1
    return None


@dataclass(frozen=True)
class Layout:
    """A parallel layout: tensor x pipeline x virtual chunks (and data parallel, for ZeRO-1 only)."""
    tp: int = 1
    pp: int = 1
    vp: int = 1

    def stages(self) -> int:
        return self.pp * self.vp

    def check(self, config: GPTConfig, what: str = "target") -> None:
        """Refuse, naming the values, a layout this model cannot be split into."""
        errors = []
        for name, value in (("tensor", self.tp), ("pipeline", self.pp), ("virtual pipeline", self.vp)):
            if not isinstance(value, int) or value < 1:
                errors.append(f"{what} {name}-parallel size must be a positive integer, got {value!r}")
        if errors:
            raise CheckpointError("; ".join(errors))
        if config.num_attention_heads % self.tp:
            errors.append(f"{what} tensor-parallel size {self.tp} does not divide num_attention_heads "
                          f"({config.num_attention_heads})")
        if config.num_layers % self.stages():
            errors.append(f"{what} pipeline size {self.pp} x virtual {self.vp} = {self.stages()} stages do not "
                          f"divide num_layers ({config.num_layers})")
        if errors:
            raise CheckpointError("; ".join(errors))

    def chunks(self, config: GPTConfig, pp_rank: int) -> list[dict]:
        """``ParallelGPT`` keyword arguments of each model chunk of pipeline rank ``pp_rank``."""
        per = config.num_layers // self.stages()
        out = []
        for c in range(self.vp):
            stage = c * self.pp + pp_rank
            out.append(dict(layer_offset=stage * per, num_layers=per, pre_process=stage == 0,
                            post_process=stage == self.stages() - 1))
        return out


def stage_param_names(config: GPTConfig, layout: Layout, tp_rank: int, pp_rank: int) -> list[list[tuple[str, tuple]]]:
    """Per chunk, ``(local name, shape)`` of every parameter, in ``named_parameters()`` order (meta device)."""
    from lessons_pkg.tensor_parallel import ParallelGPT, TPShape

    out = []
    with torch.device("meta"):
        for kwargs in layout.chunks(config, pp_rank):
            model = ParallelGPT(config, TPShape(layout.tp, tp_rank), **kwargs)
            out.append([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    return out


def global_name(local: str, layer_offset: int) -> str:
    """``layers.3.mlp...`` of a chunk starting at ``layer_offset`` -> ``layers.{3 + offset}.mlp...``."""
    if local.startswith("layers."):
        _, i, rest = local.split(".", 2)
        return f"layers.{int(i) + layer_offset}.{rest}"
    return local


def config_from_args(args, vocab_size: int, where: str = "the checkpoint") -> GPTConfig:
    """The :class:`GPTConfig` of a checkpoint's saved arguments (Megatron's names), with ``vocab_size`` rows."""
    def get(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    missing = [n for n in ("hidden_size", "num_layers", "num_attention_heads", "max_position_embeddings")
               if get(n) is None]
    if missing:
        raise CheckpointError(f"{where}: the saved args have no {', '.join(missing)}: cannot tell the model's sizes")
    return GPTConfig(
        vocab_size=int(vocab_size), hidden_size=get("hidden_size"), num_layers=get("num_layers"),
        num_attention_heads=get("num_attention_heads"), max_position_embeddings=get("max_position_embeddings"),
        hidden_dropout=get("hidden_dropout", 0.1), attention_dropout=get("attention_dropout", 0.1),
        init_method_std=get("init_method_std", 0.02), layernorm_epsilon=get("layernorm_epsilon", 1e-5),
        make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128), gelu_approximate=mf.gelu_approximate(args))


@dataclass(frozen=True)
class VocabHints:
    """What the command line knows of the real vocabulary: ``--true-vocab-size`` and/or a tokenizer's size."""
    true_vocab_size: int | None = None
    tokenizer_size: int | None = None
    tokenizer_source: str = "the tokenizer"


# --- the source --------------------------------------------------------------------------------
@dataclass
class SourceCheckpoint:
    """A saved checkpoint of any layout, read one full-size tensor at a time."""
    files: CheckpointFiles
    args: argparse.Namespace
    config: GPTConfig             # vocab_size: the real tokens, or every padded row when that is unknown
    layout: Layout
    vocab: VocabSize
    version: float
    iteration: int
    consumed_train_samples: int
    scheduler: dict | None
    _open: dict = field(default_factory=dict, repr=False)
    _zero: dict = field(default_factory=dict, repr=False)

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab.padded

    @classmethod
    def open(cls, root: str, vocab: VocabHints = VocabHints(), iteration="latest") -> "SourceCheckpoint":
        files = find_checkpoint(root, iteration)
        where = files.model_file(0, 0)
        first = mf.safe_load(where, mmap=True)
        for key in ("args", "model") if "model" in first else ("args",):
            if key not in first:
                raise CheckpointError(f"{where} has no {key!r}: not a Megatron checkpoint file")
        args = mf.read_args(first["args"], where)
        mf.check_supported(args, where)
        vp = len(mf.model_keys(first))
        saved = (getattr(args, "tensor_model_parallel_size", None) or files.tp,
                 getattr(args, "pipeline_model_parallel_size", None) or files.pp)
        if saved != (files.tp, files.pp):
            raise CheckpointError(f"{files.folder}: the folders say TP={files.tp} x PP={files.pp} but the saved args say "
                             f"TP={saved[0]} x PP={saved[1]} (mixed or renamed layouts)")
        version = float(first.get("checkpoint_version", 0.0))
        vocab_size = _resolve_vocab(args, first, files, version, vocab)
        config = config_from_args(args, vocab_size.rows, where)
        layout = Layout(files.tp, files.pp, vp)
        layout.check(config, "source")
        iteration_saved = int(first.get("iteration", files.iteration or 0))
        consumed = int(first.get("consumed_train_samples", getattr(args, "consumed_train_samples", 0) or 0))
        src = cls(files, args, config, layout, vocab_size, version, iteration_saved, consumed,
                  first.get("opt_param_scheduler"))
        src._check_shapes(first)
        return src

    # files are mapped lazily and closed by release(), so memory holds one layer at a time
    def _file(self, tp_rank: int, pp_rank: int) -> dict:
        key = (tp_rank, pp_rank)
        if key not in self._open:
            self._open[key] = mf.safe_load(self.files.model_file(tp_rank, pp_rank), mmap=True)
        return self._open[key]

    def release(self, force: bool = False) -> None:
        """Unmap the source files (their pages leave memory); per layer only for checkpoints worth streaming."""
        if force or self.streaming:
            self._open.clear()

    @property
    def streaming(self) -> bool:
        """Re-open the files per layer only above 256 MiB: below it, re-reading their indexes costs more."""
        if not hasattr(self, "_streaming"):
            import os

            total = sum(os.path.getsize(self.files.model_file(t, p))
                        for t in range(self.files.tp) for p in range(self.files.pp))
            self._streaming = total > STREAM_BYTES
        return self._streaming

    def _chunk(self, tp_rank: int, pp_rank: int, chunk: int) -> dict[str, torch.Tensor]:
        state = self._file(tp_rank, pp_rank)
        keys = mf.model_keys(state)
        if len(keys) != self.layout.vp:
            raise CheckpointError(f"{self.files.model_file(tp_rank, pp_rank)} holds {len(keys)} model chunks, "
                             f"{self.files.model_file(0, 0)} holds {self.layout.vp} (mixed layouts)")
        heads = self.config.num_attention_heads // self.layout.tp
        return mf.from_megatron(state[keys[chunk]], self.version, heads)

    def locate(self, key: str) -> list[tuple[int, int, str]]:
        """``(pp_rank, chunk, local name)`` of every place holding ``key`` (the head copy is a second place)."""
        per = self.config.num_layers // self.layout.stages()
        if key.startswith("layers."):
            g = int(key.split(".")[1])
            stage = g // per
            return [(stage % self.layout.pp, stage // self.layout.pp, f"layers.{g % per}." + key.split(".", 2)[2])]
        last = self.layout.stages() - 1
        if key.startswith("final_layernorm."):
            return [(last % self.layout.pp, last // self.layout.pp, key)]
        if key == mf.HEAD:
            return [(last % self.layout.pp, last // self.layout.pp, mf.HEAD)] if last > 0 else []
        return [(0, 0, key)]

    def full(self, key: str) -> torch.Tensor:
        """The full-size tensor ``key`` (master name), glued over tensor ranks; word embedding keeps its padding."""
        places = self.locate(key)
        if not places:
            raise KeyError(key)
        pp_rank, chunk, local = places[0]
        shards = []
        for t in range(self.layout.tp):
            stage = self._chunk(t, pp_rank, chunk)
            if local not in stage:
                raise CheckpointError(f"{self.files.model_file(t, pp_rank)} (chunk {chunk}) has no {local!r}")
            shards.append(stage[local])
        return glue(key, shards, self.files.model_file(0, pp_rank))

    # --- optimizer -------------------------------------------------------------------------------
    def _moments_of_rank(self, tp_rank: int, pp_rank: int) -> dict | None:
        """``{chunk{c}.{local name}: {"exp_avg", "exp_avg_sq", "step"}}`` of one rank, or None (none saved)."""
        key = (tp_rank, pp_rank)
        if key in self._zero:
            return self._zero[key]
        state = self._file(tp_rank, pp_rank)
        zero_files = self.files.zero_files(tp_rank, pp_rank)
        if "optimizer" in state and isinstance(state["optimizer"], dict) and "param_names" in state["optimizer"]:
            return moments_by_name(state["optimizer"])  # views into the mapped file: not kept past release()
        if zero_files:
            moments = zero_moments_by_name([mf.safe_load(f) for f in zero_files])
            self._zero[key] = moments  # ZeRO-1 slices: glued once per rank, kept
            return moments
        return None

    def has_optimizer(self) -> bool:
        return self._moments_of_rank(0, 0) is not None

    def optimizer_hyper(self) -> tuple[list[dict], dict | None]:
        """The saved Adam param-group hyper-parameters (without ``params``) and the loss-scaler state."""
        state = self._file(0, 0)
        if "optimizer" in state and "param_names" in state["optimizer"]:
            opt = state["optimizer"]
        else:
            opt = mf.safe_load(self.files.zero_files(0, 0)[0])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["adam"]["param_groups"]]
        return groups, opt.get("loss_scaler")

    def full_moments(self, key: str) -> dict[str, torch.Tensor]:
        """``exp_avg``/``exp_avg_sq`` of parameter ``key``, full size (like :meth:`full`), and Adam's ``step``."""
        pp_rank, chunk, local = self.locate(key)[0]
        name = f"chunk{chunk}.{local}"
        parts = {"exp_avg": [], "exp_avg_sq": []}
        step = None
        for t in range(self.layout.tp):
            moments = self._moments_of_rank(t, pp_rank)
            if moments is None or name not in moments:
                raise CheckpointError(f"{self.files.rank_dir(t, pp_rank)}: no optimizer state for {name!r}")
            for k in parts:
                parts[k].append(moments[name][k])
            step = moments[name]["step"]
        where = self.files.model_file(0, pp_rank)
        return {"exp_avg": glue(key, parts["exp_avg"], where, check_replicas=False),
                "exp_avg_sq": glue(key, parts["exp_avg_sq"], where, check_replicas=False), "step": step}

    def _check_shapes(self, first: dict) -> None:
        """Every tensor of rank (0, 0) has the shape the arguments imply: catches wrong args or foreign models."""
        expected = stage_param_names(self.config, self.layout, 0, 0)
        for c, params in enumerate(expected):
            stage = mf.from_megatron(first[mf.model_keys(first)[c]], self.version,
                                     self.config.num_attention_heads // self.layout.tp)
            for name, shape in params:
                if name in (mf.WORD, mf.HEAD):  # the padded vocabulary is the checkpoint's own
                    shape = (self.padded_vocab_size // self.layout.tp, shape[1])
                if name not in stage:
                    raise CheckpointError(f"{self.files.model_file(0, 0)}: chunk {c} has no {name!r}")
                if tuple(stage[name].shape) != shape:
                    raise CheckpointError(f"{self.files.model_file(0, 0)}: {name!r} has shape {tuple(stage[name].shape)}, "
                                     f"the saved args (hidden {self.config.hidden_size}, heads "
                                     f"{self.config.num_attention_heads}, TP {self.layout.tp}) imply {shape}")


def _resolve_vocab(args, first: dict, files: CheckpointFiles, version: float, hints: VocabHints) -> VocabSize:
    """Padded rows (from the word embedding itself) and real tokens (:mod:`lessons_pkg.checkpoint.vocab`)."""
    import os

    where = files.model_file(0, 0)
    heads = getattr(args, "num_attention_heads", None)
    stage = mf.from_megatron(first[mf.model_keys(first)[0]], version,
                             heads // files.tp if heads and version < 2.0 else None)
    if mf.WORD not in stage:
        raise CheckpointError(f"{where} holds no word embedding ({mf.WORD}): not the first pipeline stage of a GPT")
    rows = stage[mf.WORD].shape[0] * files.tp
    saved = getattr(args, "padded_vocab_size", None)
    if saved is not None and saved != rows:
        raise CheckpointError(f"{where}: args.padded_vocab_size is {saved} but the word embedding has {rows} rows "
                         f"({stage[mf.WORD].shape[0]} per tensor rank x {files.tp})")
    size, source = hints.tokenizer_size, hints.tokenizer_source
    vocab_file = getattr(args, "vocab_file", None)
    recorded = [hints.true_vocab_size, getattr(args, "true_vocab_size", None), getattr(args, "orig_vocab_size", None)]
    if size is None and all(v is None for v in recorded) and vocab_file and os.path.isfile(vocab_file):
        size, source = vocab_file_size(vocab_file), f"args.vocab_file {vocab_file}"
    return resolve_vocab_size(args, rows, files.tp, hints.true_vocab_size, size, source, where=files.folder)


def glue(key: str, shards: list[torch.Tensor], where: str, check_replicas: bool = True) -> torch.Tensor:
    """Tensor ranks' slices of ``key`` -> the full tensor (replicated ones checked equal across ranks)."""
    dim = partition_dim(key)
    if dim is None:
        if check_replicas:
            for t, s in enumerate(shards[1:], start=1):
                if s.shape != shards[0].shape or not torch.equal(s, shards[0]):
                    diff = (s.float() - shards[0].float()).abs().max().item() if s.shape == shards[0].shape else "shape"
                    raise CheckpointError(f"{where}: replicated tensor {key!r} differs between tensor ranks 0 and {t} "
                                     f"(max difference {diff}): the checkpoint is inconsistent")
        return shards[0].clone()
    return torch.cat([s for s in shards], dim=dim)


def moments_by_name(opt: dict) -> dict[str, dict]:
    """Our plain optimizer state (``{"adam": torch state, "param_names": [...]}``) -> moments by parameter name."""
    adam, names = opt["adam"], opt["param_names"]
    order = [i for g in adam["param_groups"] for i in g["params"]]
    out = {}
    for i, name in zip(order, names):
        s = adam["state"].get(i)
        if s is not None:
            out[name] = {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"], "step": s["step"]}
    return out


def zero_moments_by_name(shards: list[dict]) -> dict[str, dict]:
    """ZeRO-1 slices of every data-parallel rank -> per-parameter moments (the flat buffer cut back apart)."""
    shards = sorted(shards, key=lambda s: s["dp_rank"])
    if [s["dp_rank"] for s in shards] != list(range(shards[0]["dp_size"])):
        raise CheckpointError(f"distributed-optimizer files of data-parallel ranks {[s['dp_rank'] for s in shards]}, "
                         f"expected 0..{shards[0]['dp_size'] - 1}: some are missing")
    names, numels = shards[0]["param_names"], shards[0]["numels"]
    flat = {}
    step = None
    for k in ("exp_avg", "exp_avg_sq"):
        pieces = []
        for s in shards:
            size = s["shard"][1] - s["shard"][0]
            states = [s["adam"]["state"].get(i) for g in s["adam"]["param_groups"] for i in g["params"]]
            if all(st is None for st in states):  # saved before Adam's first step: zero moments
                mine = [torch.zeros(size)]
            elif any(st is None for st in states):
                raise CheckpointError(f"distributed-optimizer slice of data-parallel rank {s['dp_rank']} has Adam state "
                                 "for only some of its parameter groups")
            else:
                mine = [st[k].reshape(-1) for st in states]
                step = states[0]["step"]
            if sum(p.numel() for p in mine) != size:
                raise CheckpointError(f"distributed-optimizer slice of data-parallel rank {s['dp_rank']} holds "
                                 f"{sum(p.numel() for p in mine)} elements, expected {size}")
            pieces += mine
        flat[k] = torch.cat(pieces)
    out, offset = {}, 0
    for name, n, shape in zip(names, numels, shards[0]["shapes"]):
        out[name] = {k: flat[k][offset:offset + n].view(shape).clone() for k in flat}
        out[name]["step"] = step if step is not None else torch.tensor(0.0)
        offset += n
    return out


# --- the target --------------------------------------------------------------------------------
def fit_vocab(full: torch.Tensor, true_vocab: int, padded: int) -> torch.Tensor:
    """Rows ``[V_src_pad, ...]`` -> ``[padded, ...]``: real rows kept, source dummy rows kept while they fit, zeros after."""
    if padded < true_vocab:
        raise CheckpointError(f"a padded vocabulary of {padded} rows cannot hold the {true_vocab} real tokens")
    if full.size(0) == padded:
        return full
    if full.size(0) > padded:
        return full[:padded].clone()
    pad = full.new_zeros((padded - full.size(0), *full.shape[1:]))
    return torch.cat([full, pad])


def split(key: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s slice of the full tensor ``key``."""
    dim = partition_dim(key)
    if dim is None:
        return full
    n = full.size(dim) // tp
    return full.narrow(dim, tp_rank * n, n).clone()


def adam_state_for(names: list[str], params_by_name: dict, moments: dict[str, dict], hyper: list[dict]) -> dict:
    """Our plain optimizer state for parameters ``names`` (the order ``Optimizer`` will use)."""
    from lessons_pkg.training.param_groups import no_weight_decay

    decay = [n for n in names if not no_weight_decay(n, params_by_name[n])]
    no_decay = [n for n in names if no_weight_decay(n, params_by_name[n])]
    order = decay + no_decay
    state = {i: {"step": moments[n]["step"].clone(), "exp_avg": moments[n]["exp_avg"],
                 "exp_avg_sq": moments[n]["exp_avg_sq"]} for i, n in enumerate(order) if n in moments}
    groups = [dict(hyper[0], params=list(range(len(decay)))),
              dict(hyper[1], params=list(range(len(decay), len(order))))]
    return {"adam": {"state": state, "param_groups": groups}, "param_names": order}


class _ShapeOnly:
    """What ``no_weight_decay`` needs of a parameter: its number of dimensions."""

    def __init__(self, shape):
        self.ndim = len(shape)


def build_rank_state(src: SourceCheckpoint, target: Layout, tp_rank: int, pp_rank: int, with_optim: bool = True,
                     args_updates: dict | None = None, padded_vocab_size: int | None = None,
                     on_layer=None) -> dict:
    """The ``model_optim_rng.pt`` contents of target rank ``(tp_rank, pp_rank)``, in Megatron's format.

    Streams: each tensor is read full-size from the source, fitted to the
    target's padded vocabulary and cut to this rank's slice; the source files
    are released after every layer. ``on_layer(g)`` is called as global layer ``g`` is started.
    """
    config = src.config
    target.check(config)
    padded = padded_vocab_size or vocab_size_with_padding(config.vocab_size, target.tp,
                                                          config.make_vocab_size_divisible_by)[0]
    if padded < config.vocab_size or padded % target.tp:
        raise CheckpointError(f"padded vocabulary {padded} cannot hold {config.vocab_size} tokens in {target.tp} equal "
                         "slices")
    chunks = stage_param_names(config, target, tp_rank, pp_rank)
    layouts = target.chunks(config, pp_rank)
    with_optim = with_optim and src.has_optimizer()
    state: dict = {}
    names, shapes, moments = [], {}, {}
    for c, (params, kw) in enumerate(zip(chunks, layouts)):
        stage: dict[str, torch.Tensor] = {}
        current_layer = None
        for local, _shape in params:
            key = global_name(local, kw["layer_offset"])
            layer = key.split(".")[1] if key.startswith("layers.") else None
            if layer != current_layer:
                src.release()  # drop the previous layer's mapped pages
                current_layer = layer
                if layer is not None and on_layer is not None:
                    on_layer(int(layer))
            source_key = mf.WORD if key == mf.HEAD else key
            full = src.full(source_key)
            if source_key == mf.WORD:
                full = fit_vocab(full, config.vocab_size, padded)
            stage[local] = split(key, full, target.tp, tp_rank)
            if tuple(stage[local].shape) != tuple(_shape) and source_key != mf.WORD:
                raise CheckpointError(f"{key}: the source gives shape {tuple(stage[local].shape)} at TP={target.tp}, "
                                 f"the model expects {tuple(_shape)}")
            if with_optim:
                m = src.full_moments(source_key)
                if source_key == mf.WORD:
                    m = {k: fit_vocab(v, config.vocab_size, padded) if k != "step" else v for k, v in m.items()}
                name = f"chunk{c}.{local}"
                moments[name] = {k: split(key, v, target.tp, tp_rank) if k != "step" else v for k, v in m.items()}
                names.append(name)
                shapes[name] = _ShapeOnly(stage[local].shape)
        state["model" if target.vp == 1 else f"model{c}"] = mf.to_megatron(stage)
    src.release(force=True)
    updates = dict(tensor_model_parallel_size=target.tp, pipeline_model_parallel_size=target.pp,
                   virtual_pipeline_model_parallel_size=target.vp if target.vp > 1 else None,
                   num_layers_per_virtual_pipeline_stage=(config.num_layers // target.stages()
                                                          if target.vp > 1 else None),
                   padded_vocab_size=padded, true_vocab_size=src.vocab.true, use_distributed_optimizer=False,
                   consumed_train_samples=src.consumed_train_samples, iteration=src.iteration)
    updates.update(args_updates or {})
    state.update(checkpoint_version=mf.CHECKPOINT_VERSION, iteration=src.iteration,
                 args=mf.megatron_args(src.args, **updates), consumed_train_samples=src.consumed_train_samples)
    if with_optim:
        hyper, scaler = src.optimizer_hyper()
        state["optimizer"] = adam_state_for(names, shapes, moments, hyper)
        if scaler is not None:
            state["optimizer"]["loss_scaler"] = scaler
        if src.scheduler is not None:
            state["opt_param_scheduler"] = src.scheduler
    return state


# --- everything at once (small models: inference, evaluation, tests) ----------------------------
@dataclass
class FullCheckpoint:
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    args: argparse.Namespace
    iteration: int
    vocab: VocabSize


def read_full_checkpoint(root: str, vocab: VocabHints = VocabHints()) -> FullCheckpoint:
    """The master (TP=1, real vocabulary) state dict of a checkpoint of any layout.

    When the real vocabulary is unknown (see :mod:`lessons_pkg.checkpoint.vocab`), every padded row is kept.
    """
    src = SourceCheckpoint.open(root, vocab)
    names = [n for n, _ in stage_param_names(src.config, Layout(), 0, 0)[0]]
    state = {}
    for key in names:
        full = src.full(key)
        state[key] = full[: src.config.vocab_size].clone() if key == mf.WORD else full
        if key.startswith("layers.") and key.endswith("mlp.dense_4h_to_h.bias"):
            src.release()
    src.release(force=True)
    return FullCheckpoint(src.config, state, src.args, src.iteration, src.vocab)
