"""Building and loading the kernels: lazy import, the cache, toolchain diagnostics, the CUDA compile check."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from lessons_pkg.kernels import build


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=build.REPO_ROOT)


def test_import_compiles_and_loads_nothing():
    done = _python(
        "import sys, lessons_pkg.kernels as k\n"
        "from lessons_pkg.kernels import build\n"
        "assert build._loaded is None, build._loaded\n"
        "assert 'lessons_pkg.kernels.ops' not in sys.modules\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
        "print('ok')\n")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_second_start_loads_the_cached_library_without_compiling():
    path = build.load()  # compiles only if `make setup` / an earlier test did not
    assert path.endswith(".so") and path == build.load()
    done = _python("from lessons_pkg.kernels.build import load; print(load())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == path and "compiling" not in done.stdout, done.stdout
    ops = getattr(torch.ops, build.NAMESPACE)
    assert all(hasattr(ops, op) for op in build.OPERATORS)


def test_library_name_changes_with_the_sources(monkeypatch, tmp_path):
    """A changed source gives a new library name, so a stale build is never loaded."""
    before = build.library_name(with_cuda=False)
    fake = tmp_path / "csrc"
    shutil.copytree(build.CSRC, fake)
    monkeypatch.setattr(build, "CSRC", fake)
    assert build.library_name(with_cuda=False) == before
    (fake / "bias_gelu.cpp").write_text((fake / "bias_gelu.cpp").read_text() + "\n// changed\n")
    assert build.library_name(with_cuda=False) != before


def test_missing_tools_are_named(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(build.KernelBuildError) as err:
        build.check_toolchain(with_cuda=False)
    assert "a C++ compiler: '/nonexistent/c++' is not on PATH" in str(err.value)
    assert "ninja" in str(err.value)


def test_compile_error_is_reported_with_the_compiler_lines(tmp_path, capsys):
    source = tmp_path / "broken.cpp"
    source.write_text("int broken() { return undefined_variable_here; }\n")
    with pytest.raises(build.KernelBuildError) as err:
        build._compile("lessons_broken_test", tmp_path / "out", [source], with_cuda=False, verbose=False)
    message = str(err.value)
    assert "compiling the fused kernels failed" in message and "undefined_variable_here" in message, message
    assert "compiling fused kernels" in capsys.readouterr().out  # it said what it compiles


@pytest.mark.skipif(build.find_cuda_home() is None, reason="nvcc not found: the CUDA compile check needs the CUDA toolkit")
def test_cuda_sources_compile_with_nvcc():
    """Every csrc/cuda/*.cu compiles (nvcc -c, sm_80) against this torch's headers: no GPU needed.
    Cached by source hash; `python -m lessons_pkg.kernels build` (make setup) runs it first."""
    objects = build.compile_cuda_objects()
    assert sorted(o.name.split("_sm")[0] for o in objects) == sorted(p.stem for p in (build.CSRC / "cuda").glob("*.cu"))
    for obj in objects:
        assert obj.stat().st_size > 0
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        assert "forward_kernel" in symbols, f"{obj.name} holds no forward kernel"
