"""``--profile``: where one iteration's time goes, with ``torch.profiler`` (Megatron's ``--use-pytorch-profiler``).

The profiler records iterations ``--profile-step-start`` to ``--profile-step-end - 1`` (1-based,
as the log counts them; the default 10-11 skips warm-up), then rank 0 prints one table: the ops and
kernels that took the most time, sorted by their own (self) time on the device that computes
(CUDA kernels on a GPU, CPU ops on the CPU). ``--profile-trace FILE`` also writes rank 0's trace
in Chrome's format (open it in ``chrome://tracing`` or https://ui.perfetto.dev).

Reading the table: on a GPU, its last line, ``Self CUDA time total``, is the GPU's busy time
(the rows list both ops and the kernels they launch, so do not add them up); an iteration's
wall time well above it means the GPU waited for the host (Python, kernel launches,
``.item()`` synchronisations). ``scripts/trace_breakdown.py`` charges each kernel of the trace
to the op that launched it.

A run that ends inside the window (``--exit-interval``, an error) still gets its table, of the
iterations recorded so far: the trainer calls :meth:`IterationProfiler.close` on its way out.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


class IterationProfiler:
    """Starts ``torch.profiler`` before iteration ``start``, stops it after iteration ``end - 1``."""

    def __init__(self, start: int, end: int, device: torch.device, rank: int, trace: str | None = None,
                 rows: int = 25):
        if not 1 <= start < end:
            raise ValueError(f"profile steps must satisfy 1 <= start < end, got start={start}, end={end}")
        self.start, self.end, self.device, self.rank, self.trace, self.rows = start, end, device, rank, trace, rows
        self.prof = None
        self.report: str | None = None

    def before(self, iteration: int) -> None:
        """Call before iteration ``iteration`` (1-based) runs."""
        if iteration == self.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities, record_shapes=False)
            self.prof.__enter__()

    def after(self, iteration: int) -> None:
        """Call after iteration ``iteration`` (1-based) has finished (its device work synchronised)."""
        if self.prof is not None and iteration == self.end - 1:
            self._stop(iteration)

    def close(self, iteration: int) -> None:
        """Stop and report if still recording (a run that ended inside the window, after ``iteration``)."""
        if self.prof is not None:
            self._stop(iteration, early=True)

    def _stop(self, last: int, early: bool = False) -> None:
        self.prof.__exit__(None, None, None)
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort_by, row_limit=self.rows)
        n = last - self.start + 1
        note = f" (the run ended inside the window, which was {self.start}-{self.end - 1})" if early else ""
        self.report = f"profile of iteration(s) {self.start}-{last} ({n} iteration(s)){note}, sorted by {sort_by}:\n{table}"
        if self.rank == 0:
            print(self.report, flush=True)
            if self.trace:
                self.prof.export_chrome_trace(self.trace)
                print(f"profile trace written to {self.trace}", flush=True)
        self.prof = None
