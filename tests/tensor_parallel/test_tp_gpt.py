"""ParallelGPT, its pipeline stages, master weights, HF conversion and parallelize() vs single-process references.

The reference is transformers' GPT2LMHeadModel built from the same full
weights (with the padded vocabulary of the tensor-parallel size, so the
dummy tokens enter its softmax exactly as they enter ours).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import ParallelGPT, master_state_dict, vocab_size_with_padding
from lessons_pkg.tensor_parallel.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_model, \
    to_hf_state_dict
from lessons_pkg.testing import run_on_ranks
from tp_reference import ATOL, RTOL, assert_shards_close, hf_grads, hf_reference, tiny_config


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _batch(config, seed=0, b=2, s=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (b, s + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], torch.rand(b, s, generator=g)  # input ids, labels, per-token loss weights


def check_gpt(rank: int, tp: int, group) -> None:
    config = tiny_config()
    sd = master_state_dict(config, seed=11)
    ids, labels, w = _batch(config)

    hf, hf_cfg = hf_reference(config, sd, tp)
    logits_ref = hf(ids).logits                                              # [b, s, padded V]
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    (loss_ref * w).sum().backward()
    ref_grads = hf_grads(hf, hf_cfg)

    for recompute in (False, True):
        model = ParallelGPT(dataclasses.replace(config, recompute_activations=recompute), tp_group=group)
        assert model.padded_vocab_size == hf_cfg.vocab_size
        model.load_master_state_dict(sd)
        logits = model(ids)                                                  # [b, s, padded V / tp]
        assert logits.shape == (2, 8, model.padded_vocab_size // tp)
        _close(logits, logits_ref.detach().chunk(tp, -1)[rank], f"logits recompute={recompute}")
        loss = model(ids, labels=labels)
        _close(loss, loss_ref.detach(), f"per-token loss recompute={recompute}")
        (loss * w).sum().backward()
        n = assert_shards_close(model.named_parameters(), ref_grads, rank, tp, f"gpt recompute={recompute}")
        assert n == len(sd)
        # the merged weights are the master weights again (dummy vocabulary rows dropped)
        full = model.full_state_dict()
        assert full.keys() == sd.keys()
        for k in sd:
            assert torch.equal(full[k], sd[k]), k


def check_pipeline_stages(rank: int, tp: int, group) -> None:
    """Two stages held by one rank, chained by hand, equal the whole model (outputs and every gradient)."""
    config = tiny_config(num_layers=3)
    sd = master_state_dict(config, seed=12)
    ids, labels, w = _batch(config, seed=1)
    whole = ParallelGPT(config, tp_group=group)
    whole.load_master_state_dict(sd)
    (whole(ids, labels=labels) * w).sum().backward()
    whole_grads = {whole.global_layer_name(n): p.grad for n, p in whole.named_parameters()}

    first = ParallelGPT(config, tp_group=group, pre_process=True, post_process=False, layer_offset=0, num_layers=1)
    last = ParallelGPT(config, tp_group=group, pre_process=False, post_process=True, layer_offset=1, num_layers=2)
    assert not hasattr(first, "final_layernorm") and not hasattr(last, "embedding")
    for stage in (first, last):
        stage.load_master_state_dict(sd)
    hidden = first(ids)                                                      # [b, s, h]
    assert hidden.shape == (2, 8, config.hidden_size)
    boundary = hidden.detach().requires_grad_()                              # what a pipeline sends between ranks
    loss = last(boundary, labels=labels)
    _close(loss, whole(ids, labels=labels).detach(), "two-stage loss")
    (loss * w).sum().backward()
    hidden.backward(boundary.grad)
    # each copy of the tied embedding has part of the gradient; their sum (the embedding-group all-reduce) is whole's
    tied = first.shared_embedding_weight().grad + last.shared_embedding_weight().grad
    _close(tied, whole.embedding.word_embeddings.weight.grad, "tied embedding gradient (sum of both stages)")
    for stage in (first, last):
        for name, p in stage.named_parameters():
            if p is stage.shared_embedding_weight():
                continue
            _close(p.grad, whole_grads[stage.global_layer_name(name)], f"stage grad {name}")


def check_parallelize(rank: int, tp: int, group) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lessons_pkg import parallelize

    torch.manual_seed(3)  # every rank builds the same full model
    hf_config = GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                           eos_token_id=0, pad_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    serial = GPT2LMHeadModel(hf_config).eval()
    model = parallelize(copy.deepcopy(serial), tp_group=group)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 3 * 32 // tp)
    ids = torch.randint(1, 120, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _close(model(ids).logits, serial(ids).logits, "parallelize logits")
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    expected = serial.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(generated, expected), f"greedy generation differs:\n{generated}\n{expected}"
    if tp > 1:
        bad = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8 * (tp + 1), n_layer=1, n_head=tp + 1))
        with pytest.raises(ValueError, match=rf"num_attention_heads \(n_head\) \({tp + 1}\) is not divisible by "
                                             rf"tensor_model_parallel_size \({tp}\)"):
            parallelize(bad, tp_group=group)


def rank_main(tp: int) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    check_gpt(rank, tp, group)
    check_pipeline_stages(rank, tp, group)
    check_parallelize(rank, tp, group)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_gpt_matches_serial(tp):
    run_on_ranks(rank_main, tp, args=(tp,), timeout=180)


def test_vocab_padding_matches_megatron():
    # the numbers Megatron-LM prints for GPT-2 ("padded vocab (size: 50257) with 431 dummy tokens (new size: 50688)")
    assert vocab_size_with_padding(50257, 1) == (50304, 47)
    assert vocab_size_with_padding(50257, 2) == (50432, 175)
    assert vocab_size_with_padding(50257, 4) == (50688, 431)
    assert vocab_size_with_padding(128, 1, 128) == (128, 0)
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive integer, got 0"):
        vocab_size_with_padding(50257, 0)


def test_hf_conversion_round_trip_and_logits():
    config = tiny_config()
    sd = master_state_dict(config, seed=5)
    hf_sd = to_hf_state_dict(sd, config)
    back = from_hf_state_dict(hf_sd, config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert config_from_hf(config_to_hf(config), make_vocab_size_divisible_by=8) == config  # HF has no such field
    # our single-process model (vocabulary padded 100 -> 104) and the converted HF model give the same logits
    model = ParallelGPT(config).eval()
    model.load_master_state_dict(sd)
    ids, _, _ = _batch(config)
    ours = model(ids)
    assert ours.shape[-1] == 104
    _close(ours[..., :100], to_hf_model(sd, config)(ids).logits, "HF-converted logits")


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match=r"hidden_size \(1000\) is not divisible by num_attention_heads \(16\)"):
        tiny_config(hidden_size=1000, num_attention_heads=16)
    with pytest.raises(ValueError, match=r"layers \[2, 5\) are not within the model's num_layers \(2\)"):
        ParallelGPT(tiny_config(), layer_offset=2, num_layers=3)
    with pytest.raises(TypeError, match="the first stage takes input_ids"):
        ParallelGPT(tiny_config())(torch.randn(1, 4, 32))


def _tied_copies_at_construction(tp):
    """A pipeline of 2 stages: the last stage's copy of the word embedding equals the first stage's
    weight as soon as the stages are built (no master weights loaded), and counts once in the norm."""
    from lessons_pkg.training.grads import counts_in_norm

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=2)
    first = parallel_state.is_pipeline_first_stage()
    torch.manual_seed(100 + dist.get_rank())  # different random draws on every rank: equality is not luck
    stage = ParallelGPT(tiny_config(num_layers=2), pre_process=first, post_process=not first,
                        layer_offset=0 if first else 1, num_layers=1)
    weight = stage.shared_embedding_weight().detach()
    theirs = weight.clone()
    dist.broadcast(theirs, src=parallel_state.get_embedding_ranks()[0], group=parallel_state.get_embedding_group())
    return torch.equal(weight, theirs), weight.abs().sum().item() > 0, counts_in_norm(stage.shared_embedding_weight(), 0)


@pytest.mark.parametrize("tp", [1, 2])
def test_parallel_gpt_keeps_the_tied_embedding_copies_equal(tp):
    results = run_on_ranks(_tied_copies_at_construction, 2 * tp, args=(tp,), timeout=60)
    ranks_first = [r for r in range(2 * tp) if r < tp]  # rank grid: pipeline stage = rank // tp
    for rank, (equal, nonzero, counted) in enumerate(results):
        assert equal and nonzero, f"rank {rank}"
        assert counted == (rank in ranks_first), f"rank {rank}: the last stage's copy must not count in the norm"
