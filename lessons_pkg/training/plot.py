"""Draw the loss curve of a pretraining run from its ``--log-json`` record.

    python -m lessons_pkg.training.plot outputs/ch6/pretrain/log.jsonl outputs/ch6/pretrain_loss.png

Prints whether the training loss went down (mean of the last 5 iterations below the first
iteration's loss) and exits non-zero if it did not.
"""
from __future__ import annotations

import json
import sys


def read_log(path: str) -> dict[str, dict[int, float]]:
    """``{"train": {iteration: loss}, "valid": {...}, "test": {...}}``; a resumed run's later lines win."""
    curves: dict[str, dict[int, float]] = {"train": {}, "valid": {}, "test": {}}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            curves[record["kind"]][record["iteration"]] = record["lm_loss"]
    return curves


def plot_losses(curves: dict[str, dict[int, float]], ax, title: str = "") -> None:
    train = sorted(curves["train"].items())
    ax.plot([i for i, _ in train], [v for _, v in train], label="train (lm loss)")
    valid = sorted(curves["valid"].items())
    if valid:
        ax.plot([i for i, _ in valid], [v for _, v in valid], "o--", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.legend()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_log(argv[0])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot_losses(curves, ax, "GPT pretraining")
    fig.tight_layout()
    fig.savefig(argv[1], dpi=120)
    losses = [v for _, v in sorted(curves["train"].items())]
    went_down = len(losses) > 5 and sum(losses[-5:]) / 5 < losses[0]
    print(f"loss curve written to {argv[1]}; training loss went down: {went_down}")
    return 0 if went_down else 1


if __name__ == "__main__":
    sys.exit(main())
