"""Exercise ch6d.3: a TP=2 x PP=2 x DP=2 run that reproduces the TP=1 loss curve.

The checker runs pretrain_gpt.py twice with the same model, data and seed
(4 layers, hidden 32, mock data of 300 token ids, global batch 8): once on 1
process with TP=PP=1, once on NPROC processes with your layout. Your ARGS go
to both runs (the layout flags only to the second). Every iteration's loss
must agree to 2e-5 (float32: the same sums in another order).

Same weights, same samples in the same order, same optimizer: yet the first
try will not match. Find out why, and make the two runs comparable.

    python src/ch6/pretrain_gpt.py --help
    torchrun --nproc_per_node 8 src/ch6/pretrain_gpt.py ... --log-json 3d.jsonl     # compare the lm loss lines
    # on a cluster (src/ch6/slurm/README.md): salloc --nodes 2 --ntasks-per-node 1, then
    # srun torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint $MASTER:29500 src/ch6/pretrain_gpt.py ...

Check: python -m lessons_pkg.labs check ch6d.3   (9 CPU processes in all: a minute or two)
"""

NPROC = None   # processes for TP=2 x PP=2 x DP=2
ARGS = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
