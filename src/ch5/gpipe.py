"""GPipe with torchgpipe: GPT-2 cut into partitions, every mini-batch split into micro-batches.

    python src/ch5/gpipe.py                     # tiny GPT-2, local text, 4 partitions, 300 steps
    python src/ch5/gpipe.py --steps 40          # a quick check
    python src/ch5/gpipe.py --model-name gpt2 --dataset squad --balance 3 5 5 1 --chunks 4 \\
        --batch-size 24 --seq-len 256 --steps 300   # the lesson's run: GPT-2 small on 4 GPUs (needs network)

What happens:

1. GPT-2 becomes ``nn.Sequential(embedding, block_0 .. block_{n-1}, head)``
   (gpt2_sequential.py); ``--balance`` says how many of these layers each
   partition gets, e.g. ``2 1 1 2`` for the 6 layers of the 4-block model.
2. ``GPipe(model, balance, devices, chunks)`` places partition j on
   ``devices[j]`` ('cuda:j' when there are enough GPUs, otherwise 'cpu' for
   all) and splits every input batch into ``chunks`` micro-batches that flow
   through the partitions in a pipeline (torchgpipe's ``clock_cycles``).
   On CPU all partitions share one worker thread, so the run shows the
   mechanics, not a speed-up.
3. Before training, the pipelined forward and backward are checked against
   the untouched ``GPT2LMHeadModel`` on the same batch: logits and the
   gradient of every parameter. The script exits with status 1 if they differ
   or if the loss does not fall.

Lines that start with ``check:`` are the verifications.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torchgpipe import GPipe
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from lessons_pkg.utils import largest, max_abs_error, within

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_sequential import (  # noqa: E402
    dropout_disabled, hf_parameter_names, lm_loss, load_gpt2, sequential_from_hf, sync_tied_gradients,
    tiny_config, tied_pair,
)
from text_data import load_texts, random_windows, token_stream, train_tokenizer  # noqa: E402

# torchgpipe 0.0.7 calls tensor.storage(), which recent PyTorch flags as deprecated.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated")

# float32: the pipeline runs the same operations on micro-batches instead of
# the whole batch, so results differ from the reference only by the order of
# floating-point reductions (observed ~1e-7 on CPU).
TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-name", default=None,
                   help="load this pretrained model from the hub (e.g. gpt2); default: a tiny fresh GPT-2")
    p.add_argument("--dataset", default="stdlib", choices=["stdlib", "squad"],
                   help="training text: Python's docstrings (offline) or SQuAD contexts (hub)")
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512, help="size of the locally trained BPE tokenizer")
    p.add_argument("--partitions", type=int, default=4, help="number of partitions when --balance is not given")
    p.add_argument("--balance", type=int, nargs="+", default=None,
                   help="layers per partition (embedding, blocks and head count as layers); default: even split")
    p.add_argument("--chunks", type=int, default=4, help="micro-batches per mini-batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"],
                   help="auto: cuda:0..p-1 when there are p GPUs, else cpu for every partition")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3, 3e-5 for a pretrained model)")
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def even_balance(num_layers: int, partitions: int) -> list[int]:
    """``num_layers`` split into ``partitions`` nearly equal parts, the larger ones first: 6, 4 -> [2, 2, 1, 1]."""
    if not 1 <= partitions <= num_layers:
        raise ValueError(f"partitions ({partitions}) must be between 1 and the number of layers ({num_layers})")
    base, extra = divmod(num_layers, partitions)
    return [base + (j < extra) for j in range(partitions)]


def check_balance(balance: list[int], num_layers: int) -> None:
    """Raise ``ValueError`` naming the values unless ``balance`` is positive and sums to ``num_layers``."""
    if sum(balance) != num_layers or min(balance) < 1:
        raise ValueError(
            f"balance {balance} must be positive and sum to the model's {num_layers} layers "
            f"(embedding + {num_layers - 2} blocks + head), but sums to {sum(balance)}"
        )


def pipeline_devices(partitions: int, device: str = "auto") -> list[torch.device]:
    """One device per partition: ``cuda:0 .. cuda:{p-1}`` if that many GPUs exist (and device='auto'), else cpu."""
    if device == "auto" and torch.cuda.device_count() >= partitions:
        return [torch.device("cuda", j) for j in range(partitions)]
    return [torch.device("cpu")] * partitions


def compare_with_reference(pipe: GPipe, seq: torch.nn.Sequential, reference: GPT2LMHeadModel,
                           input_ids: torch.Tensor) -> tuple[float, float]:
    """Run one forward + backward through the pipeline and through ``reference`` on the same batch.

    Returns ``(max |logits error|, max |gradient error| over every parameter)``;
    leaves all gradients zeroed. Dropout is switched off in both for the
    comparison (the two would otherwise draw different masks).
    """
    with dropout_disabled(pipe, reference):
        ref_logits = reference(input_ids.to(reference.device)).logits  # [batch, seq, vocab]
        lm_loss(ref_logits, input_ids).backward()
        logits = pipe(input_ids.to(pipe.devices[0]))  # [batch, seq, vocab] on the last device
        lm_loss(logits, input_ids).backward()
    sync_tied_gradients(*tied_pair(seq))

    logits_error = max_abs_error(logits, ref_logits)
    ours, theirs = dict(seq.named_parameters()), dict(reference.named_parameters())
    grad_error = largest(max_abs_error(ours[a].grad, theirs[b].grad) for a, b in hf_parameter_names(reference))
    pipe.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return logits_error, grad_error


def build_model(args: argparse.Namespace) -> tuple[GPT2LMHeadModel, bool]:
    """``--model-name`` from the hub (an error if it cannot be loaded), or by default a fresh tiny GPT-2; and whether pretrained."""
    config = tiny_config(args.vocab_size, n_positions=max(128, args.seq_len), n_embd=args.n_embd,
                         n_layer=args.n_layer, n_head=args.n_head)
    model = load_gpt2(args.model_name, fallback=config)
    return model, model.config is not config


def build_tokens(args: argparse.Namespace, pretrained: bool) -> torch.Tensor:
    """The training text as one token stream: the pretrained model's tokenizer, or a BPE trained here."""
    texts = load_texts(args.dataset)
    if pretrained:
        tokenizer = GPT2TokenizerFast.from_pretrained(args.model_name)
    else:
        tokenizer = train_tokenizer(texts, args.vocab_size)
    return token_stream(texts, tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.chunks > args.batch_size:
        print(f"error: --chunks ({args.chunks}) must not exceed --batch-size ({args.batch_size})", file=sys.stderr)
        return 2
    try:
        reference, pretrained = build_model(args)
        tokens = build_tokens(args, pretrained)
    except RuntimeError as error:  # --model-name / --dataset asked for and not available: no substitute
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_layers = reference.config.n_layer + 2  # embedding, blocks, head
    balance = args.balance or even_balance(num_layers, args.partitions)
    check_balance(balance, num_layers)
    lr = args.lr or (3e-5 if pretrained else 1e-3)

    seq = sequential_from_hf(reference)  # its own copy of the weights; `reference` stays as the check
    devices = pipeline_devices(len(balance), args.device)
    reference.to(devices[0])
    pipe = GPipe(seq, balance=balance, devices=devices, chunks=args.chunks)
    n_params = sum(p.numel() for p in pipe.parameters())
    print(f"GPT-2: {len(seq) - 2} blocks, hidden {reference.config.n_embd}, vocab {reference.config.vocab_size}, "
          f"{n_params / 1e6:.2f}M parameters (the LM head is a second copy of the embedding)")
    print(f"GPipe: balance {balance} over devices {[str(d) for d in devices]}, "
          f"{args.chunks} micro-batches of {args.batch_size // args.chunks} sequences x {args.seq_len} tokens")
    for j, partition in enumerate(pipe.partitions):
        print(f"  partition {j} on {devices[j]}: {', '.join(type(layer).__name__ for layer in partition)}")

    batches = random_windows(tokens, args.batch_size, args.seq_len, seed=args.seed)
    logits_error, grad_error = compare_with_reference(pipe, seq, reference, next(batches))
    logits_ok, grads_ok = within(logits_error, TOLERANCE), within(grad_error, TOLERANCE)
    print(f"check: pipelined logits match GPT2LMHeadModel (max error < {TOLERANCE:g}): {logits_ok}")
    print(f"check: gradients of all {len(list(seq.parameters()))} parameters match GPT2LMHeadModel "
          f"(max error < {TOLERANCE:g}): {grads_ok}")
    if not (logits_ok and grads_ok):
        print(f"max logits error {logits_error:.3g}, max gradient error {grad_error:.3g}", file=sys.stderr)
        return 1
    del reference

    optimizer = torch.optim.Adam(pipe.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        input_ids = next(batches)  # [batch, seq]
        logits = pipe(input_ids.to(devices[0]))  # [batch, seq, vocab], on devices[-1]
        loss = lm_loss(logits, input_ids)
        loss.backward()
        sync_tied_gradients(*tied_pair(seq))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.log_interval == 0 or step == args.steps - 1:
            print(f"step {step:4d} | loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    print(f"{args.steps} steps in {seconds:.1f} s ({seconds / max(args.steps, 1) * 1e3:.0f} ms/step)")

    window = max(1, args.steps // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    fell = last < first
    emb, head = tied_pair(seq)
    tied_ok = torch.equal(emb.detach().cpu(), head.detach().cpu())
    print(f"mean loss of the first {window} steps {first:.3f}, of the last {window} steps {last:.3f}")
    print(f"check: loss fell (mean of the last {window} steps < mean of the first {window}): {fell}")
    print(f"check: the embedding and LM-head copies of the tied matrix are still identical: {tied_ok}")
    return 0 if fell and tied_ok else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
