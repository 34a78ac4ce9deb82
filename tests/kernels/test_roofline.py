"""lessons_pkg/kernels/roofline.py: the figure explains its markers, and the numbers it prints are the rows'."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lessons_pkg.kernels import roofline  # noqa: E402
from lessons_pkg.kernels.bench import Row  # noqa: E402

CEILING, PEAK = 20.0, 80.0   # GB/s, GFLOP/s: ridge at 4 FLOP/B


def rows() -> list[Row]:
    # 1e6 least bytes and 2e6 FLOPs (2 FLOP/B) in 0.1 ms: 20 GFLOP/s, the roof's 40 at that intensity halved;
    # the stream time 0.025 ms puts the hollow marker at 80 GFLOP/s, above the drawn roof (a cache-sized tensor)
    return [Row("bias_gelu", "8x8", "forward", {"fused": 0.1}, min_bytes=1_000_000, flops=2e6, stream_ms=0.025),
            Row("layer_norm", "8x8", "forward+backward", {"fused": 0.5}, min_bytes=2_000_000, flops=3e6)]


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def legend_entries(ax) -> dict[str, object]:
    legend = ax.get_legend()
    assert legend is not None, "the roofline has no legend"
    return {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def test_the_legend_explains_hollow_and_filled_markers(ax):
    roofline.plot(rows(), CEILING, PEAK, ax)
    entries = legend_entries(ax)
    hollow = [label for label in entries if label.startswith("hollow")]
    filled = [label for label in entries if label.startswith("filled")]
    assert hollow == [roofline.HOLLOW_LABEL] and "stream time" in hollow[0], sorted(entries)
    assert filled == [roofline.FILLED_LABEL], sorted(entries)
    assert entries[roofline.HOLLOW_LABEL].get_markerfacecolor() == "none", "the hollow entry is drawn filled"
    assert entries[roofline.FILLED_LABEL].get_markerfacecolor() != "none", "the filled entry is drawn hollow"
    assert any(label.startswith("roof:") for label in entries) and any(label.startswith("ridge") for label in entries)
    assert {"bias_gelu forward", "layer_norm forward+backward"} <= set(entries)


def test_the_markers_sit_where_the_rows_put_them(ax):
    roofline.plot(rows(), CEILING, PEAK, ax)
    single = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]   # the markers, one point each
    drawn = [(line.get_xdata()[0], line.get_ydata()[0], line.get_markerfacecolor() == "none") for line in single
             if math.isfinite(line.get_xdata()[0])]                           # NaN: the legend's style entries
    assert (pytest.approx(2.0), pytest.approx(20.0), False) in drawn
    assert (pytest.approx(2.0), pytest.approx(80.0), True) in drawn        # above the roof (40 at 2 FLOP/B)
    assert (pytest.approx(1.5), pytest.approx(6.0), False) in drawn
    assert len(drawn) == 3, drawn                                           # no stream time: no hollow marker


def test_summary_lines_compute_the_share_of_the_roof():
    lines = roofline.summary_lines(rows(), CEILING, PEAK)
    assert len(lines) == 2
    assert "intensity  2.00 FLOP/B (memory-bound side of the ridge at 4.0)" in lines[0]
    assert "20.0 GFLOP/s =  50% of the roof" in lines[0] and "4.00x the stream time" in lines[0]
    assert " - the stream time" in lines[1]
    assert roofline.roof(CEILING, PEAK, 10.0) == PEAK and roofline.roof(CEILING, PEAK, 1.0) == CEILING
