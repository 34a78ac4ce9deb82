"""Megatron-style progress lines, plus TensorBoard and a JSON-lines record of every iteration.

One line per ``--log-interval`` iterations, the loss averaged over the interval::

     iteration       20/     200 | consumed samples:          320 | elapsed time per iteration (ms): 388.3 |
     learning rate: 2.344E-07 | global batch size:    16 | lm loss: 1.096171E+01 | grad norm: 25.472 |
     number of skipped iterations:   0 | tokens per second: 42105.3 | ...

and one block per evaluation::

     validation loss at iteration 100 | lm loss value: 8.687662E+00 | lm loss PPL: 5.929304E+03 |

Only the rank that calls it prints (the training loop gives it the numbers on
global rank 0). ``--log-json FILE`` appends one JSON object per iteration and
per evaluation, with the exact float losses, which is what the tests compare.
"""
from __future__ import annotations

import json
import math
import os

from lessons_pkg.errors import output_error


def model_flops_per_iteration(args, padded_vocab_size: int) -> float:
    """Model FLOPs of one training iteration (forward + backward, no recomputation counted).

    Per token and layer: 24 h^2 (QKV, projection, 4h MLP, x2 for multiply-add)
    + 4 s h (attention scores and weighted sum); per token: 2 h V for the logits.
    Backward costs twice the forward, so x3: ``72 B s L h^2 (1 + s/(6h) + V/(12 L h))``
    (Narayanan et al., 2021, without the recomputation term), B the global batch.
    """
    b, s, layers, h = args.global_batch_size, args.seq_length, args.num_layers, args.hidden_size
    # per sequence and layer: QKV + output projection 8 s h^2, MLP 4 s h ffn (= 16 s h^2), scores + weighted sum 4 s^2 h
    per_layer = 8 * s * h * h + 4 * s * h * args.ffn_hidden_size + 4 * s * s * h
    return 3.0 * b * (layers * per_layer + 2 * s * h * padded_vocab_size)


class TrainingLogger:
    def __init__(self, args, padded_vocab_size: int, enabled: bool):
        self.args, self.enabled = args, enabled
        self.flops = model_flops_per_iteration(args, padded_vocab_size)
        self.writer = None
        self.json = None
        self._reset()
        if not enabled:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.log_json)), exist_ok=True)
            self.json = open(args.log_json, "a")

    def _reset(self) -> None:
        self.losses, self.skipped, self.nan, self.time, self.samples = [], 0, 0, 0.0, 0

    def _record(self, **fields) -> None:
        if self.json is not None:
            try:
                self.json.write(json.dumps(fields) + "\n")
                self.json.flush()
            except OSError as e:  # a full disk: name the file (Python's error names none)
                raise output_error(self.args.log_json, e) from None

    def iteration(self, iteration: int, consumed: int, seconds: float, lr: float, loss: float,
                  grad_norm: float | None, loss_scale: float | None = None,
                  global_batch_size: int | None = None) -> None:
        """One iteration's numbers; ``global_batch_size``: this iteration's (``--rampup-batch-size``)."""
        if not self.enabled:
            return
        batch = global_batch_size or self.args.global_batch_size
        skipped = grad_norm is None
        self.skipped += skipped
        self.nan += not math.isfinite(loss)
        if not skipped and math.isfinite(loss):
            self.losses.append(loss)
        self.time += seconds
        self.samples += batch
        self._record(kind="train", iteration=iteration, consumed_samples=consumed, lm_loss=loss,
                     grad_norm=grad_norm, learning_rate=lr, loss_scale=loss_scale, seconds=seconds,
                     global_batch_size=batch)
        if self.writer is not None:
            self.writer.add_scalar("lm loss", loss, iteration)
            self.writer.add_scalar("learning-rate", lr, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, iteration)
        a = self.args
        if iteration % a.log_interval and iteration != a.train_iters:
            return
        n = max(len(self.losses), 1)
        iters = a.log_interval if iteration % a.log_interval == 0 else iteration % a.log_interval
        ms = 1000.0 * self.time / iters
        tokens_per_s = self.samples * a.seq_length / self.time if self.time > 0 else 0.0
        # model FLOPs per second, the count being for the full global batch (--rampup-batch-size: fewer)
        tflops = self.flops * self.samples / a.global_batch_size / self.time / a.world_size / 1e12 \
            if self.time > 0 else 0.0  # per device, as Megatron reports
        line = (f" iteration {iteration:8d}/{a.train_iters:8d} | consumed samples: {consumed:12d} | "
                f"elapsed time per iteration (ms): {ms:.1f} | learning rate: {lr:.6E} | "
                f"global batch size: {batch:5d} | ")
        if self.losses:
            line += f"lm loss: {sum(self.losses) / n:.6E} | "
        if loss_scale is not None:
            line += f"loss scale: {loss_scale:.1f} | "
        if grad_norm is not None:
            line += f"grad norm: {grad_norm:.3f} | "
        line += (f"number of skipped iterations: {self.skipped:3d} | number of nan iterations: {self.nan:3d} | "
                 f"tokens per second: {tokens_per_s:.1f} | TFLOP/s per device: {tflops:.4f} |")
        if a.peak_tflops:
            line += f" MFU: {100.0 * tflops / a.peak_tflops:.1f}% |"
        print(line, flush=True)
        if self.writer is not None:
            self.writer.add_scalar("tokens-per-second", tokens_per_s, iteration)
        self._reset()

    def evaluation(self, label: str, iteration: int, loss: float, split: str = "valid") -> None:
        """``label`` is e.g. ``iteration 100`` or ``the end of training for val data``."""
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        text = f" {'validation' if split == 'valid' else 'test'} loss at {label} | lm loss value: {loss:.6E} | " \
               f"lm loss PPL: {ppl:.6E} | "
        bar = "-" * (len(text) + 1)
        print(f"{bar}\n{text}\n{bar}", flush=True)
        self._record(kind=split, iteration=iteration, lm_loss=loss, ppl=ppl, label=label)
        if self.writer is not None:
            self.writer.add_scalar(f"lm loss {split}", loss, iteration)
            self.writer.add_scalar(f"lm loss {split} ppl", ppl, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.json is not None:
            self.json.close()
