"""Checkpoints after training (chapter 6e), one idea per module.

    layout           where the files of a Megatron checkpoint are; a complete iteration, checked
    megatron_format  what is inside a file (Megatron-LM's legacy GPT tree), reading it safely
    vocab            the real vocabulary size of a checkpoint that records only its padded one
    reshard          any TP x PP (x virtual) -> any other, weights and Adam state, streamed layer by layer
    hf_io            transformers GPT-2 folders, both ways
    convert          the whole conversion, written atomically (src/ch6/checkpoint_util.py)
    pretrained       load_pretrained / build_stage: a trained model of any layout, for inference and evaluation
    transformers_converter  transformers' own Megatron converter (4.46.3), run from a side folder
"""
from lessons_pkg.checkpoint.pretrained import Pretrained, build_stage, is_hf_folder, load_pretrained, load_tokenizer

__all__ = ["Pretrained", "build_stage", "is_hf_folder", "load_pretrained", "load_tokenizer"]
