"""Measure the clock this CPU core actually runs at (not the nominal one /proc/cpuinfo may show).

    python scripts/cpu_clock.py

Cycle counts only become times with the real clock: docs/benchmarks.md turns the LayerNorm kernels'
vector-operation counts into microseconds with it. A virtual machine's /proc/cpuinfo often shows the
nominal frequency, while the core runs at its boost clock.

How: a chain of dependent register-to-register integer adds, one per cycle on x86-64 cores
(latency 1; a register operand rather than a constant, which some recent cores add at renaming,
faster than one per cycle), compiled with the system's C compiler: adds / second = cycles / second.
The best of a few runs is printed (another process on the core can only make a run slower).
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
  const long iterations = 400000000;
  long x = 0, one = 1;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < iterations; i++)  /* four dependent adds: the loop's own work runs beside them */
    __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(one));
  clock_gettime(CLOCK_MONOTONIC, &b);
  double seconds = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
  printf("%.4f\n", 4.0 * iterations / seconds / 1e9);
  return x != 4 * iterations;
}
"""


def measure_ghz(runs: int = 3) -> float:
    """The best of ``runs`` measurements, in GHz."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"cpu_clock.py measures x86-64 cores (inline assembly); this is {platform.machine()}")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc or gcc) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "clock"
        (Path(tmp) / "clock.c").write_text(SOURCE)
        built = subprocess.run([compiler, "-O2", "-o", str(exe), str(Path(tmp) / "clock.c")], capture_output=True,
                               text=True)
        if built.returncode != 0:
            raise SystemExit(f"{compiler} could not compile the clock loop:\n{built.stderr[-2000:]}")
        return max(float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
                   for _ in range(runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    nominal = None  # MHz, as the kernel reports it (a VM's is often the nominal clock)
    try:
        with open("/proc/cpuinfo") as f:
            nominal = float(next(line.split(":", 1)[1] for line in f if line.startswith("cpu MHz")))
    except (OSError, StopIteration, ValueError):
        pass
    ghz = measure_ghz(args.runs)
    print(f"measured core clock: {ghz:.2f} GHz (best of {args.runs} runs of dependent adds)"
          + (f"; /proc/cpuinfo says {nominal / 1000:.2f} GHz" if nominal else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
