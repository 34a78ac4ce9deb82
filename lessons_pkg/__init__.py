"""lessons_pkg: the package behind the course on large-scale language-model training.

Modules (each one idea):
    parallel_state   tensor / context / data / pipeline process groups (Megatron rank order)
    utils            seeding and rank-0 printing
    launch           run a script under torchrun with a timeout and rank-ordered output
    testing          run a function on N ranks in a test, with a timeout
    tensor_parallel  Megatron-style tensor-parallel layers and GPT      (chapter 6), sequence parallelism (6f)
    context_parallel ring attention over a sequence split across ranks  (chapter 6f)
    pipeline         GPipe / 1F1B / interleaved schedules and executor  (chapter 5)
    kernels          compiled fused kernels with their PyTorch references
    data             Megatron indexed datasets and the GPT dataset
"""

__all__ = ["parallelize"]


def __getattr__(name):
    # Imported lazily: `import lessons_pkg` stays cheap and needs no transformers.
    if name == "parallelize":
        from lessons_pkg.tensor_parallel.replace import parallelize

        return parallelize
    raise AttributeError(f"module 'lessons_pkg' has no attribute {name!r}")
