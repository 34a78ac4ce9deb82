"""Ship the kernel sources with the package: ``csrc/`` is copied to ``lessons_pkg/csrc/`` in every build.

Everything else is in pyproject.toml. The kernels compile just-in-time on the
learner's machine (lessons_pkg/kernels/build.py), so a non-editable
``pip install .`` needs the sources inside the installed package.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        source = ROOT / "csrc"
        if source.is_dir():  # absent in an sdist built without it: MANIFEST.in grafts it in
            shutil.copytree(source, Path(self.build_lib) / "lessons_pkg" / "csrc", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithKernelSources})
