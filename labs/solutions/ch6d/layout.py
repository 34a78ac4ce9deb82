"""Solution ch6d.3. 8 = 2 x 2 x 2 processes. Dropout (on by default, 0.1) draws its masks from each
rank's random state: a tensor-parallel rank drops its own slice of features, a pipeline stage its own
layers, so no two layouts drop the same activations. Turn dropout off in both runs and the curves agree."""

NPROC = 8
ARGS = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--hidden-dropout", "0", "--attention-dropout", "0"]
