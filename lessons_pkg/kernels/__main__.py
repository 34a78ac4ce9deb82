"""``python -m lessons_pkg.kernels build``: compile and load the fused kernels ahead of time."""
import sys

from lessons_pkg.kernels.build import main

sys.exit(main())
