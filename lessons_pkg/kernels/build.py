"""Compile and load the fused kernels of ``csrc/`` with ``torch.utils.cpp_extension``.

What :func:`load` does, once per process:

1. Picks the sources: every ``csrc/*.cpp`` (the CPU kernels and the operator
   schema), plus every ``csrc/cuda/*.cu`` when this torch sees a CUDA device.
2. Names the library after the CPU instruction set torch uses on this machine
   (AVX512, AVX2 or DEFAULT), ``_cuda`` when CUDA sources are in, and a hash of
   the sources and flags: ``lessons_kernels_avx512_1a2b3c4d``. A changed source
   gives a new name, so a stale library is never loaded.
3. If ``build/kernels/<name>/<name>.so`` was built before (its ``.ok`` stamp
   exists), loads it with ``torch.ops.load_library``: no compiler, no ninja,
   a few milliseconds.
4. Otherwise checks the toolchain (C++ compiler, ninja, nvcc for CUDA), prints
   what it compiles, and runs ``cpp_extension.load`` (ninja, ``-O3``, the
   vector instruction set, OpenMP for ``at::parallel_for``). A failure raises
   :class:`KernelBuildError` naming what is missing, the compiler's own error
   lines after it. One process compiles at a time: it holds
   ``build/kernels/<name>.building`` (its pid and host). A build killed midway
   leaves that file behind; the next build sees that its owner is gone, says
   so, removes it (and torch's own ``lock``) and compiles.

The library registers its operators with the dispatcher
(``TORCH_LIBRARY(lessons_kernels, ...)`` in ``csrc/ops.cpp``); they are then
``torch.ops.lessons_kernels.<op>``, with a CPU and, if compiled, a CUDA kernel each.

:func:`compile_cuda_objects` compiles the ``.cu`` files to object files with
``nvcc -c`` (one GPU architecture, cached by source hash): the check, runnable
without a GPU, that the CUDA sources compile against this torch's headers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# the sources: csrc/ of the repository (a checkout, an editable install), or the copy
# that `pip install .` puts inside the package (setup.py copies it there)
_PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "csrc"
IN_REPOSITORY = (REPO_ROOT / "csrc").is_dir()
CSRC = REPO_ROOT / "csrc" if IN_REPOSITORY else _PACKAGED_CSRC
NAMESPACE = "lessons_kernels"  # torch.ops.lessons_kernels.*
OPERATORS = (  # declared in csrc/ops.cpp
    "bias_gelu", "scaled_masked_softmax", "scaled_upper_triang_masked_softmax", "layer_norm",  # differentiable
    "bias_gelu_forward", "bias_gelu_backward",
    "scaled_masked_softmax_forward", "scaled_upper_triang_masked_softmax_forward", "scaled_softmax_backward",
    "scaled_upper_triang_masked_softmax_backward",
    "layer_norm_forward", "layer_norm_backward",
)


class KernelBuildError(RuntimeError):
    """The fused kernels could not be compiled or loaded; the message says why."""


def build_root() -> Path:
    """Where compiled libraries live: ``$LESSONS_KERNELS_BUILD_DIR``, else ``<repo>/build/kernels`` in a
    checkout, else (an installed package) ``~/.cache/lessons_pkg/kernels`` (``$XDG_CACHE_HOME`` honoured)."""
    if "LESSONS_KERNELS_BUILD_DIR" in os.environ:
        return Path(os.environ["LESSONS_KERNELS_BUILD_DIR"])
    if IN_REPOSITORY:
        return REPO_ROOT / "build" / "kernels"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lessons_pkg" / "kernels"


def cpu_capability() -> str:
    """The vector instruction set torch dispatches to here: 'AVX512', 'AVX2' or 'DEFAULT'."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in ("AVX512", "AVX2") else "DEFAULT"


def cpu_flags(capability: str | None = None) -> list[str]:
    """C++ flags: optimisation, the instruction set for ``at::vec::Vectorized``, OpenMP.

    ``CPU_CAPABILITY_<X>`` selects ATen's AVX2 / AVX512 ``Vectorized`` classes
    (8 / 16 floats per register); without it they fall back to plain loops.
    ``-ffp-contract=off``: the compiler may not fuse ``a * b + c`` into one FMA on
    its own, so the kernels round where their source says (they call ``fmadd`` where
    they want one); otherwise ``g - mean(g)`` may differ from 0 for identical rows.
    """
    capability = capability or cpu_capability()
    isa = {
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
        "DEFAULT": [],
    }[capability]
    defines = [f"-DCPU_CAPABILITY={capability}"] + ([f"-DCPU_CAPABILITY_{capability}"] if isa else [])
    return ["-O3", "-ffp-contract=off", "-fopenmp", *isa, *defines]


def cuda_flags() -> list[str]:
    return ["-O3"]


def sources(with_cuda: bool) -> list[Path]:
    """The files compiled into the library, CPU first."""
    if not CSRC.is_dir():
        raise KernelBuildError(f"kernel sources not found: {CSRC} does not exist (is the repository complete?)")
    files = sorted(CSRC.glob("*.cpp"))
    if with_cuda:
        files += sorted((CSRC / "cuda").glob("*.cu"))
    return files


def library_name(with_cuda: bool) -> str:
    """``lessons_kernels_<isa>[_cuda]_<hash>``: the hash covers every source, header and flag."""
    digest = hashlib.sha256()
    headers = sorted(CSRC.glob("*.h")) + (sorted((CSRC / "cuda").glob("*.cuh")) if with_cuda else [])
    for path in sources(with_cuda) + headers:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(cpu_flags() + (cuda_flags() if with_cuda else [])).encode())
    digest.update(torch.__version__.encode())
    suffix = "_cuda" if with_cuda else ""
    return f"{NAMESPACE}_{cpu_capability().lower()}{suffix}_{digest.hexdigest()[:10]}"


def find_cuda_home() -> Path | None:
    """The CUDA toolkit: ``$CUDA_HOME``/``$CUDA_PATH``, torch's guess, ``/usr/local/cuda``, or nvcc's folder."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").exists() and (Path(candidate) / "include").is_dir():
            return Path(candidate)
    return None


def check_toolchain(with_cuda: bool) -> None:
    """Raise :class:`KernelBuildError` listing every missing tool, before any compiler runs."""
    from torch.utils import cpp_extension

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler: '{cxx}' is not on PATH (install g++ or clang++, or set CXX)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja: `ninja --version` fails (pip install ninja; it is in pyproject.toml)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        missing.append(f"the Python headers: {sysconfig.get_paths()['include']}/Python.h (install python3-dev)")
    torch_include = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    if not torch_include.exists():
        missing.append(f"torch's C++ headers: {torch_include} (this torch wheel ships without them)")
    if with_cuda and find_cuda_home() is None:
        missing.append("the CUDA toolkit: nvcc not found (set CUDA_HOME, or install cuda-toolkit)")
    if missing:
        raise KernelBuildError("cannot compile the fused kernels; missing:\n  - " + "\n  - ".join(missing))


def _compiler_errors(text: str, limit: int = 20) -> str:
    lines = [line for line in text.splitlines() if re.search(r"error|undefined reference|fatal", line, re.I)]
    return "\n".join(lines[:limit]) or text[-3000:]


_loaded: str | None = None


def load(with_cuda: bool | None = None, verbose: bool = False) -> str:
    """Compile (first time) and load the kernels; return the library's path. Idempotent.

    ``with_cuda`` defaults to "this torch sees a CUDA device".
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    name = library_name(with_cuda)
    build_dir = build_root() / name
    library = build_dir / f"{name}.so"
    stamp = build_dir / f"{name}.ok"
    if not (library.exists() and stamp.exists()):
        with build_lock(build_dir):
            if not (library.exists() and stamp.exists()):  # else built by the process we waited for
                _compile(name, build_dir, sources(with_cuda), with_cuda, verbose)
                stamp.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    torch.ops.load_library(str(library))
    _loaded = str(library)
    return _loaded


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout: float | None = None, poll: float = 0.5):
    """Hold ``<build_dir>.building`` (``pid host``) while compiling into ``build_dir``.

    Another live process holding it: wait for it (``timeout`` seconds at most,
    then :class:`KernelBuildError`). An owner on this host that is no longer
    running (a build killed midway): say so, remove its lock file and torch's
    ``build_dir/lock``, and take over. Owners on other hosts (a shared file
    system) cannot be checked and are waited for.
    """
    lock = build_dir.parent / f"{build_dir.name}.building"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me, host = os.getpid(), socket.gethostname()
    start, announced = time.monotonic(), False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pass
        try:
            owner_pid, owner_host = lock.read_text().split()
            owner_pid = int(owner_pid)
        except (OSError, ValueError):  # just created and not yet written, or removed meanwhile
            owner_pid, owner_host = None, None
            if time.monotonic() - start > 5 and lock.exists():  # unreadable for long: a crash mid-write
                owner_host = host
                owner_pid = -1
        if owner_pid is not None and owner_host == host and (owner_pid < 0 or not _pid_alive(owner_pid)):
            print(f"stale kernel-build lock {lock}: its owner (pid {owner_pid}) is no longer running, "
                  "probably a compile that was killed; removing it and compiling", flush=True)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        if not announced and owner_pid is not None:
            print(f"waiting for pid {owner_pid} on {owner_host}, which is compiling the same kernels "
                  f"(lock {lock})", flush=True)
            announced = True
        if timeout is not None and time.monotonic() - start > timeout:
            raise KernelBuildError(f"{lock} is still held by pid {owner_pid} on {owner_host} after {timeout:g} s")
        time.sleep(poll)
    try:
        os.write(fd, f"{me} {host}\n".encode())
        os.close(fd)
        torch_lock = build_dir / "lock"  # torch's FileBaton: nobody else can hold it while we hold ours
        if torch_lock.exists():
            print(f"removing {torch_lock}, left by an interrupted compile", flush=True)
            torch_lock.unlink()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _compile(name: str, build_dir: Path, files: list[Path], with_cuda: bool, verbose: bool) -> None:
    """Compile ``files`` into ``build_dir/name.so`` (ninja, via cpp_extension); errors as KernelBuildError."""
    from torch.utils import cpp_extension

    check_toolchain(with_cuda)
    if with_cuda and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = str(find_cuda_home())
    build_dir.mkdir(parents=True, exist_ok=True)
    shown = ", ".join(str(f.relative_to(REPO_ROOT)) if f.is_relative_to(REPO_ROOT) else str(f) for f in files)
    print(f"compiling fused kernels ({cpu_capability()}{' + CUDA' if with_cuda else ''}): {shown}", flush=True)
    print(f"  -> {build_dir} (once; later starts load the cached library)", flush=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name=name,
            sources=[str(f) for f in files],
            extra_cflags=cpu_flags(),
            extra_cuda_cflags=cuda_flags() if with_cuda else None,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
        raise KernelBuildError(
            f"compiling the fused kernels failed ({shown}); run `python -m lessons_pkg.kernels build --verbose` "
            f"for the full log. Compiler errors:\n{_compiler_errors(str(err))}"
        ) from err
    print(f"  compiled in {time.perf_counter() - start:.0f} s", flush=True)


def cuda_include_paths(cuda_home: Path) -> list[str]:
    from torch.utils import cpp_extension

    return cpp_extension.include_paths("cpu") + [str(cuda_home / "include"), str(CSRC)]


def compile_cuda_objects(arch: str = "80", out_dir: Path | None = None) -> list[Path]:
    """Compile each ``csrc/cuda/*.cu`` to an object file with ``nvcc -c`` for ``sm_<arch>``.

    Needs nvcc, not a GPU: it checks that the CUDA kernels compile against this
    torch's headers. Cached: objects whose source hash is unchanged are kept.
    Raises :class:`KernelBuildError` with nvcc's errors.
    """
    from torch.utils import cpp_extension

    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise KernelBuildError("the CUDA toolkit: nvcc not found (set CUDA_HOME, or install cuda-toolkit)")
    out_dir = out_dir or build_root() / "nvcc-check"
    out_dir.mkdir(parents=True, exist_ok=True)
    defines = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if not (Path(torch.__file__).parent / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # A CPU-only torch wheel lacks this generated header (it only marks c10_cuda as a
        # shared library); this define makes c10/cuda/CUDAMacros.h skip it.
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh")))
    objects, running = [], []
    for source in sorted((CSRC / "cuda").glob("*.cu")):
        key = hashlib.sha256(source.read_bytes() + headers + arch.encode() + torch.__version__.encode()).hexdigest()[:10]
        obj = out_dir / f"{source.stem}_sm{arch}_{key}.o"
        objects.append(obj)
        if obj.exists():
            continue
        cmd = [
            str(cuda_home / "bin" / "nvcc"), "-c", str(source), "-o", str(obj) + ".tmp",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", *defines,
            *cpp_extension.COMMON_NVCC_FLAGS, *cuda_flags(),
            *(f"-I{p}" for p in cuda_include_paths(cuda_home)),
            f"-I{sysconfig.get_paths()['include']}",
        ]
        running.append((source, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for source, obj, process in running:  # the files compile concurrently
        log, _ = process.communicate()
        if process.returncode != 0:
            raise KernelBuildError(f"nvcc failed on {source.name}:\n{_compiler_errors(log)}")
        os.replace(str(obj) + ".tmp", obj)
    return objects


def main(argv: list[str] | None = None) -> int:
    """``python -m lessons_pkg.kernels build [--verbose] [--no-cuda-check]``.

    Builds and loads the library (CPU, plus CUDA when a GPU is visible). On a
    machine with nvcc but no GPU it also compiles the CUDA sources to object
    files (the compile check the tests run, cached), unless ``--no-cuda-check``.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lessons_pkg.kernels", description="Compile the fused kernels.")
    parser.add_argument("command", choices=["build"], help="compile (if needed) and load the kernels")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument("--no-cuda-check", action="store_true", help="skip the nvcc compile check without a GPU")
    args = parser.parse_args(argv)
    try:
        path = load(verbose=args.verbose)
        print(f"fused kernels loaded: {path}")
        namespace = getattr(torch.ops, NAMESPACE)
        print(f"operators: {', '.join(f'{NAMESPACE}.{op}' for op in OPERATORS if hasattr(namespace, op))}")
        if not torch.cuda.is_available() and not args.no_cuda_check:
            if find_cuda_home() is None:
                print("no nvcc: CUDA sources not compiled (they are compiled where a GPU is used)")
            else:
                print("no GPU, but nvcc: checking that the CUDA sources compile (nvcc -c, sm_80; cached)", flush=True)
                for obj in compile_cuda_objects():
                    print(f"  compiles: {obj.name}")
    except KernelBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
