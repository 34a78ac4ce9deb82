"""GPT-2 as a flat Sequential (src/ch5/gpt2_sequential.py): same function as GPT2LMHeadModel, causal, tied weights."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src" / "ch5"))
from gpt2_sequential import (  # noqa: E402
    CausalGPT2Block, dropout_disabled, hf_parameter_names, lm_loss, sequential_from_hf, sync_tied_gradients,
    tied_pair, tiny_config,
)

VOCAB, SEQ = 97, 12


def make_model(attn_implementation: str, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = tiny_config(VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4, dropout=dropout)
    config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sequential_matches_gpt2_lm_head_model(attn):
    model = make_model(attn)
    seq = sequential_from_hf(model)
    ids = torch.randint(0, VOCAB, (3, SEQ))
    # the same operations in the same order: equal up to float32 rounding of identical kernels (observed 0)
    torch.testing.assert_close(seq(ids), model(ids).logits, rtol=0, atol=1e-6)


def test_block_returns_a_tensor_of_the_input_shape():
    # transformers 5: GPT2Block.forward returns a tensor; the 4.x idiom `block(x)[0]` would take sample 0
    block = make_model("sdpa").transformer.h[0]
    x = torch.randn(3, SEQ, 32)
    out = block(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert out[0].shape == (SEQ, 32)  # what `[0]` would silently have passed on: one sample, not the batch


def _changed_positions(forward, t: int) -> torch.Tensor:
    """For each position, whether its output changes when only the token at position t changes."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1) % VOCAB
    with torch.no_grad():
        diff = (forward(ids) - forward(other)).abs().amax(dim=(0, 2))  # [seq]
    return diff > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blocks_called_without_a_mask_stay_causal(attn):
    seq = sequential_from_hf(make_model(attn))
    t = 7
    changed = _changed_positions(seq, t)
    assert not changed[:t].any(), f"logits before position {t} depend on token {t} ({attn} attention)"
    assert changed[t:].all(), "the change did not reach the later positions: the test could not see a leak"


def test_plain_eager_block_without_mask_is_not_causal():
    # the trap CausalGPT2Block avoids: transformers' block with eager attention and no mask sees the future
    model = make_model("eager")
    plain = torch.nn.Sequential(model.transformer.wte, *model.transformer.h)
    assert all(type(b) is GPT2Block for b in model.transformer.h)
    assert _changed_positions(plain, 7)[:7].any()


def test_causal_block_name_matches_deepspeed_type_partition():
    assert "GPT2Block" in CausalGPT2Block.__name__  # partition_method="type:GPT2Block" searches class names


def test_tied_gradients_sum_to_the_reference_gradient():
    model = make_model("sdpa", dropout=0.1)
    seq = sequential_from_hf(model)
    ids = torch.randint(0, VOCAB, (4, SEQ))
    with dropout_disabled(seq, model):
        lm_loss(model(ids).logits, ids).backward()
        lm_loss(seq(ids), ids).backward()
    assert all(m.p == 0.1 for m in seq.modules() if isinstance(m, torch.nn.Dropout))  # restored afterwards
    emb, head = tied_pair(seq)
    assert not torch.allclose(emb.grad, head.grad)  # the two uses have different gradients...
    sync_tied_gradients(emb, head)
    theirs = dict(model.named_parameters())
    ours = dict(seq.named_parameters())
    for a, b in hf_parameter_names(model):
        # float32: same operations, summation of the two uses in a different order (observed ~1e-9)
        torch.testing.assert_close(ours[a].grad, theirs[b].grad, rtol=0, atol=1e-6, msg=a)
    assert torch.equal(emb.grad, head.grad)  # ...and the same sum afterwards


def test_load_gpt2_refuses_a_named_model_it_cannot_load(monkeypatch):
    from gpt2_sequential import load_gpt2

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", offline)
    config = tiny_config(VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    with pytest.raises(RuntimeError, match=r"--model-name gpt2: could not load it \(OSError: We couldn't connect"):
        load_gpt2("gpt2", fallback=config)
    assert load_gpt2(None, fallback=config).config is config  # not named: the fresh model, by design
