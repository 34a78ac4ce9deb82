"""transformers' own Megatron GPT-2 converter, run as its authors ship it (it left transformers in version 5).

    python -m lessons_pkg.checkpoint.transformers_converter \\
        --load_path gpt2-folder --save_path megatron-ckpt \\
        --target_tensor_model_parallel_size 2 --target_pipeline_model_parallel_size 2
    python -m lessons_pkg.checkpoint.transformers_converter --convert_checkpoint_from_megatron_to_transformers \\
        --load_path megatron-ckpt/release --save_path gpt2-out --tokenizer_name gpt2-folder

Every argument is the converter's own
(``transformers/models/megatron_gpt2/checkpoint_reshaping_and_interoperability.py``).
Three of its habits surprise: transformers -> Megatron is what it does *without*
``--convert_checkpoint_from_megatron_to_transformers`` (there is no flag for that
direction); its ``--load_path`` for Megatron -> transformers is an *iteration*
folder (``release`` or ``iter_0000050``); and ``--tokenizer_name`` must name a
local folder offline. It reads ``pytorch_model.bin``, which transformers 5 no
longer writes: :func:`write_pytorch_model_bin` makes it (in a temporary folder,
when this module's command line or :func:`to_megatron` is given a folder without it). This module
only gives the file the environment it needs today, in a child process:

* transformers 4.46.3 with the ``huggingface_hub`` and ``tokenizers`` it asks
  for, installed by ``pip install --target`` into a side folder
  (``build/compat/``, or ``$LESSONS_COMPAT_DIR``) that only the child sees: the
  course keeps transformers 5. Not 4.57.6, the last 4.x: its Megatron ->
  transformers direction stops with ``KeyError: 'transformer.wpe.weight'``
  (it looks the converted names up in the dict it is filling). megatron-core
  from PyPI too: the transformers -> Megatron direction imports
  ``megatron.core.package_info``.
* torch >= 2.6 loads with ``weights_only=True``, and the converter's own files
  pickle ``args`` as ``types.SimpleNamespace`` (Megatron-LM's as
  ``argparse.Namespace``, with numpy RNG states): the child allowlists exactly
  :data:`lessons_pkg.checkpoint.megatron_format.SAFE_GLOBALS` with
  ``torch.serialization.add_safe_globals``, as torch's own error message
  advises. These classes only hold data; unpickling them runs no code.
* The transformers -> Megatron direction pads the vocabulary with Megatron-LM's
  ``megatron.training.tokenizer.tokenizer._vocab_size_with_padding``. NVIDIA does
  not publish Megatron-LM's ``megatron.training`` package on PyPI: with
  ``--megatron-path`` (the converter's flag) naming a Megatron-LM checkout, the
  child uses the real one; without it, the child also sees
  ``compat/megatron/training/tokenizer/tokenizer.py``, which holds that one
  function (three lines of arithmetic) and nothing else. (Both give the same
  files: checked against Megatron-LM core_v0.16.1, tensor for tensor.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TRANSFORMERS = "transformers==4.46.3"
PACKAGES = (TRANSFORMERS, "huggingface_hub==0.36.2", "tokenizers==0.20.3", "megatron-core==0.16.1")
CONVERTER = os.path.join("transformers", "models", "megatron_gpt2", "checkpoint_reshaping_and_interoperability.py")
PADDING_SHIM = os.path.join(HERE, "compat")

# What the child runs: allowlist our SAFE_GLOBALS (read from megatron_format.py by path, so the child imports
# nothing of lessons_pkg that would need transformers 5), then the converter file as __main__.
_CHILD = """
import importlib.util, runpy, sys
import torch
spec = importlib.util.spec_from_file_location("megatron_format", sys.argv[1])
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)
torch.serialization.add_safe_globals(mf.SAFE_GLOBALS)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class ConverterUnavailable(RuntimeError):
    """The side install could not be made; ``unreachable``: because no package registry answered."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


# what pip prints when no index (or no index holding these versions) can be reached
_UNREACHABLE = ("No matching distribution found", "Could not find a version", "NewConnectionError",
                "Max retries exceeded", "Temporary failure in name resolution", "Network is unreachable")


def compat_dir() -> str:
    return os.environ.get("LESSONS_COMPAT_DIR") or os.path.join(ROOT, "build", "compat")


def side_folder() -> str:
    return os.path.join(compat_dir(), TRANSFORMERS.replace("==", "-"))


def install(timeout: float = 600, log=print) -> str:
    """The side folder with transformers 4.46.3 and megatron-core, installed once (atomically); its path."""
    folder = side_folder()
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    os.makedirs(compat_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".install-", dir=compat_dir())
    log(f"installing {', '.join(PACKAGES)} into {folder} (once; the course's environment is not touched)")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--target", tmp, *PACKAGES]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConverterUnavailable(f"pip install of {TRANSFORMERS} did not finish in {timeout:.0f} s",
                                   unreachable=True) from None
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")]
        raise ConverterUnavailable(f"pip could not install {', '.join(PACKAGES)}: " + "\n".join(errors[-15:]),
                                   unreachable=any(u in done.stderr for u in _UNREACHABLE))
    if not os.path.isfile(os.path.join(tmp, CONVERTER)):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConverterUnavailable(f"{TRANSFORMERS} was installed but has no {CONVERTER}")
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, folder)
    except OSError:  # another process installed it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, ".complete")):
            raise
    return folder


def write_pytorch_model_bin(folder: str, out: str | None = None) -> str:
    """``pytorch_model.bin`` (what the converter reads) from a transformers 5 folder's ``model.safetensors``.

    transformers 5's ``save_pretrained`` writes safetensors only. The same
    tensors, under the same names, saved with ``torch.save`` into ``out``
    (default: ``folder`` itself) with a copy of ``config.json``; an existing
    ``pytorch_model.bin`` is left as it is. Returns the folder that holds it.
    """
    from safetensors.torch import load_file
    import torch

    out = folder if out is None else out
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return folder
    source = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(source) or not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} has no config.json with pytorch_model.bin or model.safetensors: "
                                "not a transformers model folder")
    os.makedirs(out, exist_ok=True)
    if out != folder:
        shutil.copy(os.path.join(folder, "config.json"), out)
    path = os.path.join(out, "pytorch_model.bin")
    torch.save(load_file(source), path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


def command(argv: list[str]) -> tuple[list[str], dict]:
    """The child's command line and environment for the converter's arguments ``argv``."""
    folder = install()
    paths = [folder] if "--megatron-path" in argv or any(a.startswith("--megatron-path=") for a in argv) \
        else [folder, PADDING_SHIM]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.setdefault("HF_HUB_OFFLINE", "1")   # a --tokenizer_name that is not a folder fails at once, not after retries
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    cmd = [sys.executable, "-c", _CHILD, os.path.join(HERE, "megatron_format.py"), os.path.join(folder, CONVERTER),
           *argv]
    return cmd, env


def run(argv: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the converter with ``argv``; its output is captured. ``check``: raise naming its last lines if it fails."""
    cmd, env = command(argv)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"transformers' converter failed (exit {done.returncode}) on {' '.join(argv)}:\n"
                           + "\n".join((done.stdout + done.stderr).splitlines()[-20:]))
    return done


def to_megatron(hf_folder: str, save_path: str, tp: int = 1, pp: int = 1, timeout: float = 600) -> str:
    """transformers -> Megatron with the converter: ``hf_folder`` into a TP x PP ``release`` checkpoint.

    A folder with only ``model.safetensors`` is given to the converter as a
    temporary ``pytorch_model.bin`` copy; ``hf_folder`` itself is not changed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = write_pytorch_model_bin(hf_folder, tmp)
        run(["--load_path", source, "--save_path", save_path, "--target_tensor_model_parallel_size", str(tp),
             "--target_pipeline_model_parallel_size", str(pp)], timeout)
    return save_path


def to_transformers(megatron_root: str, save_path: str, tokenizer_folder: str, timeout: float = 600) -> str:
    """Megatron -> transformers with the converter: the tracked iteration of ``megatron_root`` into a folder."""
    from lessons_pkg.checkpoint.layout import find_checkpoint

    run(["--convert_checkpoint_from_megatron_to_transformers", "--load_path", find_checkpoint(megatron_root).folder,
         "--save_path", save_path, "--tokenizer_name", tokenizer_folder], timeout)
    return save_path


def _load_path(argv: list[str]) -> int | None:
    """Index in ``argv`` of the ``--load_path`` value, or None."""
    for i, a in enumerate(argv[:-1]):
        if a == "--load_path":
            return i + 1
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        i = _load_path(argv)
        to_megatron_direction = "--convert_checkpoint_from_megatron_to_transformers" not in argv
        try:
            if to_megatron_direction and i is not None and os.path.isdir(argv[i]) \
                    and not any(n.startswith("pytorch_model") for n in os.listdir(argv[i])):
                argv[i] = write_pytorch_model_bin(argv[i], tmp)    # a transformers 5 folder: safetensors only
            cmd, env = command(argv)
        except (ConverterUnavailable, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
