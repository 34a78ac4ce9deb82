"""Megatron-style GPT pretraining (chapter 6, part 4), one idea per module.

    arguments              Megatron-LM's command-line arguments, validated before anything starts
    lr_scheduler           warm-up + cosine/linear decay to min-lr
    grads                  tied-embedding and data-parallel gradient sync, global norm, clipping
    optimizer              AdamW with Megatron's weight-decay rules (the plain data-parallel optimizer)
    distributed_optimizer  ZeRO-1: Adam state sharded over data-parallel ranks
    loss_scaler            dynamic loss scaling for float16
    checkpointing          Megatron's checkpoint layout, atomic saves, resume
    logging                Megatron's log lines, TensorBoard, a JSON-lines record
    train                  pretrain(): the loop that ties them together (used by src/ch6/pretrain_gpt.py)
"""
