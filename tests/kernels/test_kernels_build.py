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


def test_stale_build_lock_is_reported_and_recovered(tmp_path, capsys):
    """A compile killed midway leaves its lock and torch's; the next build says so and takes over."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    build_dir = tmp_path / "lessons_kernels_x"
    build_dir.mkdir()
    (tmp_path / "lessons_kernels_x.building").write_text(f"{gone.pid} {build.socket.gethostname()}\n")
    (build_dir / "lock").write_text("")
    with build.build_lock(build_dir, timeout=10):
        assert (tmp_path / "lessons_kernels_x.building").read_text().split()[0] == str(build.os.getpid())
        assert not (build_dir / "lock").exists()
    out = capsys.readouterr().out
    assert f"stale kernel-build lock {tmp_path / 'lessons_kernels_x.building'}: its owner (pid {gone.pid}) " \
           "is no longer running" in out
    assert not (tmp_path / "lessons_kernels_x.building").exists()  # released


def test_a_live_build_lock_is_waited_for_and_named(tmp_path, capsys):
    build_dir = tmp_path / "lessons_kernels_y"
    (tmp_path / "lessons_kernels_y.building").write_text(f"{build.os.getpid()} {build.socket.gethostname()}\n")
    with pytest.raises(build.KernelBuildError, match=rf"still held by pid {build.os.getpid()}"):
        with build.build_lock(build_dir, timeout=1, poll=0.1):
            pass
    assert f"waiting for pid {build.os.getpid()}" in capsys.readouterr().out


def test_a_non_editable_install_ships_the_kernel_sources(tmp_path):
    """`pip install .` (a wheel, not editable) must still find csrc/ to compile the kernels on first use.

    setup.py's build_py step is what fills the wheel; it runs here into a folder that stands for site-packages."""
    tree = tmp_path / "checkout"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(build.REPO_ROOT / name, tree / name)
    for folder in ("csrc", "lessons_pkg"):
        shutil.copytree(build.REPO_ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(site)], cwd=tree,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(tree)  # nothing of the checkout is left to find
    probe = subprocess.run(
        [sys.executable, "-c", "from lessons_pkg.kernels import build\n"
                               "print(build.IN_REPOSITORY, build.CSRC)\n"
                               "print(' '.join(p.name for p in build.sources(True)))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert probe.returncode == 0, probe.stderr
    where, names = probe.stdout.splitlines()
    assert where == f"False {site / 'lessons_pkg' / 'csrc'}"
    expected = sorted(p.name for p in build.CSRC.glob("*.cpp")) + sorted(p.name for p in (build.CSRC / "cuda").glob("*.cu"))
    assert names.split() == expected
