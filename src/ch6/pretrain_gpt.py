"""Pretrain a GPT with tensor x pipeline x data parallelism, the way Megatron-LM's pretrain_gpt.py does.

Single node, 4 processes (TP=2 x PP=2; DP = world / (TP x PP) = 1)::

    torchrun --nproc_per_node 4 src/ch6/pretrain_gpt.py \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --micro-batch-size 2 --global-batch-size 8 --train-iters 50 \\
        --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.1 \\
        --data-path data/my-gpt2_text_document --vocab-file data/vocab.json --merge-file data/merges.txt \\
        --split 949,50,1 --log-interval 10 --eval-interval 25 --eval-iters 2 --save ckpt --load ckpt

Several nodes: the same command under ``torchrun --nnodes N --node_rank i --rdzv_backend c10d
--rdzv_endpoint HOST:PORT`` on every node (or ``srun torchrun ...``, see src/ch6/slurm/).

This file holds only what is GPT-specific (Megatron's split): the model provider
(a :class:`~lessons_pkg.tensor_parallel.ParallelGPT` stage holding this rank's
shard of full-size master weights drawn from ``--seed``, so every layout starts
from the same model), the datasets provider and the loss. The loop is
:func:`lessons_pkg.training.train.pretrain`.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from lessons_pkg import parallel_state  # noqa: E402
from lessons_pkg.errors import UserError, run_cli  # noqa: E402
from lessons_pkg.training.arguments import format_args, parse_args, validate_args  # noqa: E402


class MockGPTDataset:
    """``--mock-data``: sample ``i`` is ``seq_length + 1`` random ids drawn from a generator seeded by ``(seed, i)``."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = max(num_samples, 1), seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        return {"text": rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)}


def vocab_size_of(args) -> int:
    if args.mock_data or args.tokenizer_type == "NullTokenizer":
        return args.vocab_size
    # GPT2BPETokenizer's vocab_size is the number of entries of vocab.json; the data are already
    # tokenized (.bin/.idx), so reading the two files is all training needs (no transformers import)
    from lessons_pkg.data.tokenizer import EOD_TOKEN, load_vocab_and_merges

    vocab, _ = load_vocab_and_merges(args.vocab_file, args.merge_file)
    if EOD_TOKEN not in vocab:
        raise UserError(f"{args.vocab_file} has no {EOD_TOKEN} token")
    return len(vocab)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend = args.distributed_backend or parallel_state.default_backend()
    # every check before any process group, weight or dataset exists (a UserError: one line, see run_cli)
    validate_args(args, world_size, "cuda" if backend == "nccl" else "cpu")
    vocab_size = vocab_size_of(args)  # reads --vocab-file: a broken file is reported here too

    import torch
    import torch.distributed as dist

    from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict
    from lessons_pkg.tensor_parallel.cross_entropy import cross_entropy
    from lessons_pkg.tensor_parallel.utils import mask_vocab_padding, vocab_size_with_padding
    from lessons_pkg.training.train import initialize, pretrain
    from lessons_pkg.utils import print_rank_0

    if "RANK" not in os.environ:  # plain `python pretrain_gpt.py`: a job of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    args.distributed_backend = backend
    rt = initialize(args)
    print_rank_0(f"using world size: {world_size}, data-parallel size: {args.data_parallel_size}, "
                 f"context-parallel size: {args.context_parallel_size}, tensor-model-parallel size: {args.tensor_model_parallel_size}, "
                 f"pipeline-model-parallel size: {args.pipeline_model_parallel_size}, "
                 f"micro-batches per iteration: {args.num_micro_batches}, schedule: {args.pipeline_schedule}")
    print_rank_0(format_args(args))

    print_rank_0(f"> building {'mock' if args.mock_data else args.tokenizer_type} tokenizer ...")
    padded, dummy = vocab_size_with_padding(vocab_size, args.tensor_model_parallel_size,
                                            args.make_vocab_size_divisible_by)
    print_rank_0(f" > padded vocab (size: {vocab_size}) with {dummy} dummy tokens (new size: {padded})")

    config = GPTConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, max_position_embeddings=args.max_position_embeddings,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        use_fused_kernels=args.use_fused_kernels, recompute_activations=args.recompute_activations,
        sequence_parallel=args.sequence_parallel, attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        attention_backend=args.attention_backend, gelu_approximate="tanh" if args.bias_gelu_fusion else "none")
    print_rank_0(f"> building GPT model: {args.num_layers} layers, hidden {args.hidden_size}, "
                 f"{args.num_attention_heads} heads, master weights from seed {args.seed}")
    master = master_state_dict(config, args.seed)  # full-size weights, identical on every rank and layout

    def model_provider(pre_process: bool, post_process: bool, layer_offset: int, num_layers: int):
        model = ParallelGPT(config, rt.tp_group, pre_process=pre_process, post_process=post_process,
                            layer_offset=layer_offset, num_layers=num_layers, cp_group=rt.cp_group)
        model.load_master_state_dict(master)  # this rank's shard of this stage's layers
        return model.to(rt.device)

    def datasets_provider(num_samples: list[int]):
        if args.mock_data:
            return tuple(MockGPTDataset(n, args.seq_length, vocab_size, args.seed + k)
                         for k, n in enumerate(num_samples))
        from lessons_pkg.data import build_train_valid_test_datasets

        print_rank_0(f"> building train, validation, and test datasets for GPT "
                     f"(samples: train {num_samples[0]}, valid {num_samples[1]}, test {num_samples[2]}) ...")
        # rank 0 builds the index caches once; the other ranks then load them
        datasets = None
        if dist.get_rank() == 0:
            datasets = build_train_valid_test_datasets(args.data_path, args.split, num_samples, args.seq_length,
                                                       args.seed, verbose=True, vocab_size=vocab_size)
        dist.barrier()
        if dist.get_rank() != 0:
            datasets = build_train_valid_test_datasets(args.data_path, args.split, num_samples, args.seq_length,
                                                       args.seed, verbose=False)
        if datasets[0] is None:
            raise UserError(f"--split {args.split!r} leaves no documents of {args.data_path} for training")
        return datasets

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits [mb, s, V/tp] (this rank's vocabulary slice), labels [mb, s] -> mean loss over tokens;
        # the dummy tokens of the padded vocabulary take no probability (see mask_vocab_padding)
        if args.tensor_model_parallel_size == 1:  # one rank holds the whole vocabulary, dummy tokens last:
            logits = logits[..., :vocab_size]  # cut off (a view): the loss of masking them, without its passes
        logits = mask_vocab_padding(logits.float(), vocab_size, rt.tp_rank)
        return cross_entropy(logits, labels, tp_group=rt.tp_group).mean()  # vocab-parallel when TP > 1

    pretrain(args, rt, model_provider, datasets_provider, loss_fn, padded)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
