"""The roofline of the fused kernels: achieved FLOP/s against arithmetic intensity (FLOPs per byte moved).

    from lessons_pkg.kernels import bench, roofline
    rows = bench.run("quick")
    print("\\n".join(roofline.summary_lines(rows, ceiling_gbps, peak_gflops)))
    roofline.plot(rows, ceiling_gbps, peak_gflops, ax)

A kernel's time is bounded below twice: by its bytes over the memory bandwidth and by its
FLOPs over the arithmetic rate. So its FLOP/s are at most ``min(peak, bandwidth x intensity)``,
the roof; left of the ridge point (``peak / bandwidth``) that is the memory roof. Both
numbers come from :mod:`lessons_pkg.kernels.bench`: the intensity is the approximate FLOP
count over the *least* bytes the op must move (``Row.flops / Row.min_bytes``), the roof
the copy bandwidth and matrix-multiply rate it measured.

Each kernel is drawn twice: a filled marker where it is (measured FLOP/s), a hollow one
where it would be if it took only its stream time, the time element-wise ops take to move
its least bytes at the same size (``Row.stream_ms``): its own memory roof at that size.

A filled marker can sit above the drawn roof. The roof is a model: its bandwidth is a copy
of more data than the caches hold, while tensors of a few MB stay in the last-level cache
between calls and move several times faster (the hollow markers show how much); and the
counted bytes are the least the op needs, not what the hardware moves (the FLOP counts,
``bench.FLOPS_PER_ELEMENT``, are estimates too). Above the roof means the model's
assumptions do not hold at that size, not that the kernel beats the hardware.
"""
from __future__ import annotations

from lessons_pkg.kernels.bench import Row

HOLLOW_LABEL = "hollow: the kernel at its stream time (moving its least bytes at this size)"
FILLED_LABEL = "filled: the kernel as measured"


def intensity(row: Row) -> float:
    """Approximate FLOPs per byte of the least bytes the op must move."""
    return row.flops / row.min_bytes


def roof(ceiling_gbps: float, peak_gflops: float, flop_per_byte: float) -> float:
    """The drawn roof at ``flop_per_byte``: ``min(peak, bandwidth x intensity)``, in GFLOP/s."""
    return min(peak_gflops, ceiling_gbps * flop_per_byte)


def stream_gflops(row: Row) -> float | None:
    """The FLOP/s the kernel would reach in its stream time (its hollow marker); ``None`` without one."""
    return row.flops / row.stream_ms / 1e6 if row.stream_ms else None


def summary_lines(rows: list[Row], ceiling_gbps: float, peak_gflops: float) -> list[str]:
    """One line per kernel: its intensity, the side of the ridge, its share of the roof and its stream time."""
    ridge = peak_gflops / ceiling_gbps
    lines = []
    for r in rows:
        ai = intensity(r)
        side = "memory" if ai < ridge else "compute"
        share = 100 * r.fused_gflops / roof(ceiling_gbps, peak_gflops, ai)
        stream = "-" if r.vs_stream is None else f"{r.vs_stream:.2f}x"
        lines.append(f"{r.op:22s} {r.passes:17s} intensity {ai:5.2f} FLOP/B ({side}-bound side of the ridge at "
                     f"{ridge:.1f}); {r.fused_gflops:6.1f} GFLOP/s = {share:3.0f}% of the roof, "
                     f"{100 * r.fused_gbps / ceiling_gbps:3.0f}% of copy bandwidth, {stream} the stream time")
    return lines


def plot(rows: list[Row], ceiling_gbps: float, peak_gflops: float, ax, title: str = "roofline of the fused kernels"):
    """Draw the roof, the ridge and each kernel (filled: measured; hollow: at its stream time) on ``ax``.

    The legend names the roof, the ridge, what a filled and a hollow marker mean, and each kernel
    (one colour per kernel and pass; circles forward, squares forward+backward). Returns ``ax``.
    """
    import numpy as np  # here, not at import: the benchmark itself draws nothing

    ridge = peak_gflops / ceiling_gbps
    points = [intensity(r) for r in rows] or [1.0]
    ai = np.logspace(np.log10(min(points + [ridge]) / 4), np.log10(max(points + [ridge]) * 4), 200)
    ax.plot(ai, np.minimum(peak_gflops, ceiling_gbps * ai), "k-",
            label=f"roof: copy {ceiling_gbps:.0f} GB/s, matmul {peak_gflops:.0f} GFLOP/s")
    ax.axvline(ridge, color="grey", linestyle=":", linewidth=1, label=f"ridge point: {ridge:.1f} FLOP/B")
    # the two marker styles, explained once (drawn nowhere: NaN coordinates)
    ax.plot([np.nan], [np.nan], "o", color="dimgrey", label=FILLED_LABEL)
    ax.plot([np.nan], [np.nan], "o", color="dimgrey", mfc="none", label=HOLLOW_LABEL)
    for r in rows:
        marker = "o" if r.passes == "forward" else "s"
        (point,) = ax.plot(intensity(r), r.fused_gflops, marker, label=f"{r.op} {r.passes}")
        hollow = stream_gflops(r)
        if hollow is not None:
            ax.plot(intensity(r), hollow, marker, mfc="none", color=point.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
