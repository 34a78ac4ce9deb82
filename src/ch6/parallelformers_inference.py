"""Tensor replacement (Parallelformers' idea): shard an unmodified transformers GPT-2 and generate.

    python src/ch6/parallelformers_inference.py                 # 2 ranks; --nproc 1 or 4 for others
    python src/ch6/parallelformers_inference.py --model PATH    # a local checkpoint folder
    python src/ch6/parallelformers_inference.py --model local   # skip the hub
    torchrun --nproc_per_node 2 src/ch6/parallelformers_inference.py    # the same under torchrun (or srun)

Every rank loads the same full model. ``lessons_pkg.parallelize(model)``
replaces each block's attention and MLP weights by this rank's shards
(Megatron's split) and inserts one all-reduce after each row-parallel
projection; the model's own forward and ``generate`` code run unchanged.

The model: ``--model`` (a hub name such as ``gpt2``, or a local folder saved
with ``save_pretrained``); a model named this way that cannot be loaded is an
error. ``--model auto`` (the default) tries ``gpt2`` (the hub, or a cached copy
when the hub is unreachable) and, if it cannot be loaded, says why and builds a
small GPT-2 from a local config with a fixed seed, as ``--model local`` does
(its text is gibberish, but the parallel model must still reproduce it exactly).

Each rank checks the logits and the greedy generation against the unsharded
model on one process; exit status 1 if either differs.
"""
import argparse
import copy
import os
import sys

import torch

from lessons_pkg import parallel_state, parallelize
from lessons_pkg.hub import hub_reachable
from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg.utils import check_close, print_rank_0, set_seed

RTOL, ATOL = 1e-4, 1e-5  # float32: partial products summed over ranks in a different order
PROMPT = "Tensor parallelism splits every layer across"


def load_model(name: str):
    """(model, tokenizer or None, description): ``name`` from the hub or a folder, or the local small GPT-2.

    ``auto`` falls back from ``gpt2`` to the local model (and says so); any other
    name that cannot be loaded raises ``RuntimeError`` with the reason.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if name != "local":
        wanted = "gpt2" if name == "auto" else name
        try:
            from transformers import AutoTokenizer

            offline = not os.path.isdir(wanted) and not hub_reachable()[0]  # then only a cached copy can load
            model = GPT2LMHeadModel.from_pretrained(wanted, local_files_only=offline)
            tokenizer = AutoTokenizer.from_pretrained(wanted, local_files_only=offline)
            return model.eval(), tokenizer, f"pretrained {wanted!r}"
        except Exception as error:  # noqa: BLE001 - any loading failure: fall back (auto) or stop
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
            if name != "auto":
                raise RuntimeError(f"--model {name}: could not load it ({reason})") from None
        print_rank_0(f"--model auto: could not load 'gpt2' ({reason}); using a small GPT-2 from a local config")
    set_seed(0)  # every rank builds the same weights
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval(), None, "a 2-layer GPT-2 (hidden 64, 4 heads) from a local config"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto",
                        help="hub name or local folder of a GPT-2 checkpoint; 'local' for the small local GPT-2; "
                             "'auto' (default): gpt2 if it can be loaded, else local")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    add_nproc_argument(parser, default=2)
    args = parser.parse_args()
    start_ranks(args)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    try:
        serial, tokenizer, what = load_model(args.model)
    except RuntimeError as error:  # every rank fails the same way, before any collective
        print_rank_0(f"error: {error}", file=sys.stderr)
        return 2
    print_rank_0(f"model: {what}")
    if tokenizer is not None:
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[5, 17, 42, 99, 7, 256]])             # a fixed prompt of token ids

    model = parallelize(copy.deepcopy(serial))                   # this rank's shards, in place of the full weights
    attn = model.transformer.h[0].attn
    print(f"block 0 holds {attn.num_heads} of {serial.config.n_head} heads: c_attn "
          f"{tuple(attn.c_attn.weight.shape)} (full {tuple(serial.transformer.h[0].attn.c_attn.weight.shape)}), "
          f"mlp.c_fc {tuple(model.transformer.h[0].mlp.c_fc.weight.shape)}")

    with torch.no_grad():
        same_logits = check_close(model(ids).logits, serial(ids).logits, RTOL, ATOL)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False,
                  pad_token_id=serial.config.eos_token_id, attention_mask=torch.ones_like(ids))
    generated = model.generate(ids, **kwargs)
    expected = serial.generate(ids, **kwargs)
    same_tokens = torch.equal(generated, expected)
    if rank == 0 and tokenizer is not None:
        print(f"greedy continuation: {PROMPT!r} + {tokenizer.decode(generated[0, ids.size(1):])!r}")
    elif rank == 0:  # token ids of a random model: shown as a count, the comparison below is what matters
        print(f"greedy generation: {generated.size(1) - ids.size(1)} new tokens")
    print(f"logits match the unsharded model (rtol {RTOL:g}, atol {ATOL:g}): {same_logits}; "
          f"greedy generation identical: {same_tokens}")
    return 0 if same_logits and same_tokens else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
