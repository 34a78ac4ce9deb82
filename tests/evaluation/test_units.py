"""Windows, readers, Megatron's LAMBADA cuts, the detokenizer, the metrics and the vocab-parallel scoring."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lessons_pkg.evaluation.datasets import (DataError, lambada_context_and_target, read_lambada_jsonl, read_text,
                                             wikitext_samples)
from lessons_pkg.evaluation.detokenizer import get_detokenizer, wikitext_detokenizer
from lessons_pkg.evaluation.loop import Totals
from lessons_pkg.evaluation.metrics import lambada_metrics, megatron_lines, wikitext_metrics
from lessons_pkg.evaluation.windows import Sample, num_windows, overlapping_windows
from lessons_pkg.testing import run_on_ranks


# ---- windows --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 9, 10, 17, 40])
@pytest.mark.parametrize("seq,overlap", [(8, 8), (8, 4), (8, 1), (8, 3), (5, 5)])
def test_every_label_scored_exactly_once_with_its_context(n, seq, overlap):
    tokens = list(range(100, 100 + n))
    scored = []
    for i, w in enumerate(overlapping_windows(tokens, seq, overlap)):
        assert len(w.tokens) <= seq + 1
        start = tokens.index(w.tokens[0])
        for j, m in enumerate(w.mask):
            if m:
                scored.append(start + j + 1)
                # a label after the first window has at least seq - overlap tokens of context
                assert start == 0 or j >= seq - overlap
    assert sorted(scored) == list(range(1, n)) and len(scored) == n - 1
    assert len(overlapping_windows(tokens, seq, overlap)) <= num_windows(n, seq, overlap)


def test_windows_reject_bad_overlap_and_short_text():
    with pytest.raises(ValueError, match="between 1 and the sequence length"):
        overlapping_windows(list(range(10)), 8, 9)
    with pytest.raises(ValueError, match="between 1 and the sequence length"):
        overlapping_windows(list(range(10)), 8, 0)
    with pytest.raises(ValueError, match="nothing to predict"):
        overlapping_windows([1], 8)
    with pytest.raises(ValueError, match="needs 2 mask entries"):
        Sample([1, 2, 3], [1])


# ---- LAMBADA cuts ------------------------------------------------------------------------------------

def test_strict_and_nonstrict_cuts_follow_megatron(world):
    tok = world.tokenizer
    text = "the red quixotic"
    ids = tok.tokenize(text)
    assert len(tok.tokenize(" quixotic")) > 1                   # an unseen word: several BPE tokens
    context, target = lambada_context_and_target(text, tok.tokenize, strict=False)
    assert (context, target) == (ids[:-1], ids[-1:])            # non-strict: only the last BPE token
    context, target = lambada_context_and_target(text, tok.tokenize, strict=True)
    assert context == tok.tokenize("the red") and target == tok.tokenize(" quixotic")
    # strict: the text before the last word is stripped before it is tokenized
    context, _ = lambada_context_and_target("  the red   quixotic", tok.tokenize, strict=True)
    assert context == tok.tokenize("the red")


# ---- readers: bad --valid-data inputs are errors that name the file and line --------------------------

def test_lambada_reader_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_lambada_jsonl(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_lambada_jsonl(str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_lambada_jsonl(str(blank))
    cases = {'{"text": "a good one"}\n{"text": "broken\n': ":2: not a JSON object",
             '{"text": "a good one"}\n\n{"txt": "x y"}\n': ":3: expected an object with a \"text\" field",
             '{"text": 5}\n': ":1: \"text\" must be a string",
             '{"text": "oneword"}\n': ":1: a LAMBADA passage needs a context and a last word",
             '[1, 2]\n': ":1: expected an object"}
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match=f"bad{i}.jsonl{message}"):
            read_lambada_jsonl(str(path))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a b c"}) + "\n\n" + json.dumps({"text": "d e"}) + "\n")
    assert read_lambada_jsonl(str(good)) == ["a b c", "d e"]


def test_text_reader_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine\nline two \xe9t\xe9\n")
    with pytest.raises(DataError, match="latin1.txt:2: not UTF-8"):
        read_text(str(bad))
    spaces = tmp_path / "spaces.txt"
    spaces.write_text(" \n \n")
    with pytest.raises(DataError, match="only whitespace"):
        read_text(str(spaces))
    with pytest.raises(DataError, match="no such file"):
        read_text(str(tmp_path / "nope.txt"))


# ---- WikiText: detokenizer, word count -----------------------------------------------------------------

def test_wikitext_detokenizer_and_choice_by_name():
    raw = ' = = Career = = \n The team \'s 1 @,@ 000 km ( 620 mi ) run , in 1 @.@ 5 hours : " fast " . \n'
    assert wikitext_detokenizer(raw) == ' == Career ==\nThe team\'s 1,000 km (620 mi) run, in 1.5 hours: "fast".\n'
    assert get_detokenizer("data/wikitext-103_wiki.test.tokens")[0] == "wiki"
    assert get_detokenizer("data/ptb.test.txt")[0] == "ptb"
    assert get_detokenizer("data/heldout.txt")[0] == "none"


def test_wikitext_counts_words_of_the_raw_file(world, tmp_path):
    path = tmp_path / "wiki.test.tokens"
    path.write_text("the red apple @-@ we saw\n")
    text = wikitext_samples(str(path), world.tokenizer, 8, None)
    assert text.num_original_tokens == 6                   # Megatron: raw.strip().split(" ")
    assert text.num_tokenized_tokens == len(world.tokenizer.tokenize("the red apple-we saw\n"))
    assert text.detokenizer == "wiki"


# ---- metrics and Megatron's result lines -----------------------------------------------------------------

def test_megatron_lambada_line_reproduces_the_lessons_format():
    line = megatron_lines(lambada_metrics(Totals(5153, 0, 5153, 1.0)))[1]
    assert line == (" validation results on LAMBADA | number correct: 0.0000E+00 | total examples: 5.1530E+03 | "
                    "avg accuracy: 0.0000E+00")


def test_wikitext_metrics_adjust_by_word_count():
    t = Totals(examples=3, correct=0, tokens=99, nll=99 * 3.0)
    m = wikitext_metrics(t, num_tokenized_tokens=100, num_original_tokens=51)
    assert m["avg_loss"] == pytest.approx(3.0) and m["ppl"] == pytest.approx(math.exp(3.0))
    assert m["token_ratio"] == pytest.approx(99 / 50)
    assert m["adjusted_ppl"] == pytest.approx(math.exp(99 * 3.0 / 50))
    assert "adjusted ppl: " in megatron_lines(m)[1]
    with pytest.raises(RuntimeError, match="98 tokens were scored but the text has 99"):
        wikitext_metrics(Totals(3, 0, 98, 1.0), 100, 51)


def test_nan_fails_the_metrics():
    m = lambada_metrics(Totals(2, 0, 2, float("nan")))
    assert not math.isfinite(m["perplexity"])


# ---- vocab-parallel scoring -----------------------------------------------------------------------------

def _scoring_job(full: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, vocab_size: int):
    import torch.distributed as dist

    from lessons_pkg.evaluation.scoring import score_batch, vocab_parallel_argmax, mask_dummy_tokens

    rank, size = dist.get_rank(), dist.get_world_size()
    part = full.size(-1) // size
    mine = full[..., rank * part:(rank + 1) * part]
    group = dist.new_group(list(range(size)))
    argmax = vocab_parallel_argmax(mask_dummy_tokens(mine, vocab_size, group), group)
    # plain lists: tensors would cross the result queue as shared memory the exiting rank takes away
    return argmax.tolist(), score_batch(mine, labels, mask, vocab_size, group).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_argmax_and_scores_equal_the_gathered_logits(world_size):
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 13, 16                                       # 3 dummy ids
    full = torch.randn(2, 5, padded, generator=gen)
    full[0, 0, [2, 9]] = 7.0                                     # a tie across ranks: the smaller id wins
    full[0, 1, [5, 6]] = 7.0                                     # a tie inside one rank
    full[1, 2, 14] = 50.0                                        # a dummy id with the largest logit: ignored
    full[:, 3, :vocab] -= 100.0                                  # every real logit negative, dummies at 0 below
    full[:, 3, vocab:] = 0.0
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    ranks = run_on_ranks(_scoring_job, world_size, args=(full, labels, mask, vocab), timeout=60)
    real = full[..., :vocab]
    want_argmax = real.argmax(-1)
    assert want_argmax[0, 0] == 2 and want_argmax[0, 1] == 5
    nll = F.cross_entropy(real.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(2, 5).double()
    want_nll = (nll * mask).sum(-1)
    want_correct = ((want_argmax == labels) | (mask == 0)).all(-1).double()
    for argmax, scores in ranks:
        argmax, scores = torch.tensor(argmax), torch.tensor(scores, dtype=torch.float64)
        assert torch.equal(argmax, want_argmax)
        torch.testing.assert_close(scores[:, 0], want_nll, rtol=1e-5, atol=1e-5)  # float32 softmax vs float32
        assert torch.equal(scores[:, 1], mask.sum(-1).double()) and torch.equal(scores[:, 2], want_correct)


def test_compare_two_result_files():
    from lessons_pkg.evaluation.metrics import compare

    a = {"task": "WIKITEXT103", "num_tokenized_tokens": 10, "windows": 2, "ppl": 100.0, "avg_loss": 4.6}
    assert compare(a, dict(a, ppl=100.0 * (1 + 1e-7))) == []
    assert compare(a, dict(a, ppl=100.1)) and compare(a, dict(a, windows=3))
    assert compare(a, dict(a, ppl=float("nan")))                   # NaN never agrees
