"""GPT-2 byte-level BPE from vocab.json + merges.txt: known ids, round trips, and a locally trained tokenizer."""
import json

import pytest
from tokenizers import ByteLevelBPETokenizer

from lessons_pkg.data.tokenizer import EOD_TOKEN, build_tokenizer, train_byte_level_bpe


def gpt2_byte_alphabet():
    """GPT-2's bytes_to_unicode, in its order: printable bytes keep their character, the rest map to 256+n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


# GPT-2's first seven merges (its merges.txt lines 2-8), which give GPT-2's ids 256-262.
GPT2_FIRST_MERGES = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he"]


@pytest.fixture
def tiny_gpt2_files(tmp_path):
    vocab = {symbol: i for i, symbol in enumerate(gpt2_byte_alphabet())}
    for merge in GPT2_FIRST_MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab[EOD_TOKEN] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(GPT2_FIRST_MERGES) + "\n", encoding="utf-8")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_hand_built_gpt2_prefix_gives_gpt2_ids(tiny_gpt2_files):
    tokenizer = build_tokenizer(*tiny_gpt2_files)
    assert tokenizer.vocab_size == 256 + 7 + 1 and tokenizer.eod == 263
    # These are GPT-2's real ids: "H"=39, "e"=68, "l"=75, "o"=78, "Ġthe"=262, "Ġa"=257, "he"=258.
    assert tokenizer.tokenize("Hello the") == [39, 68, 75, 75, 78, 262]
    assert tokenizer.tokenize(" a he") == [257, 220, 258]  # "Ġ" alone is byte 0x20 = id 220 in GPT-2 too
    text = "Grüße, the café!\n\ttabs and ünïcode ✓"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text  # byte-level: every string round-trips


def test_files_that_are_not_gpt2_format_are_refused(tmp_path, tiny_gpt2_files):
    vocab_file, _ = tiny_gpt2_files
    (tmp_path / "bad_merges.txt").write_text("#version: 0.2\nĠ t h\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_merges.txt:2: a merge is two symbols"):
        build_tokenizer(vocab_file, str(tmp_path / "bad_merges.txt"))
    (tmp_path / "no_eod.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token"):
        build_tokenizer(str(tmp_path / "no_eod.json"), tiny_gpt2_files[1])


def test_trained_tokenizer_is_non_empty_and_agrees_with_tokenizers(tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)][:30]
    vocab_file, merge_file = train_byte_level_bpe(texts, 400, str(tmp_path))
    assert open(merge_file, encoding="utf-8").readline().startswith("#version")  # GPT-2's two-file format
    tokenizer = build_tokenizer(vocab_file, merge_file)
    assert tokenizer.vocab_size == 400 and tokenizer.eod == json.load(open(vocab_file))[EOD_TOKEN]
    reference = ByteLevelBPETokenizer.from_file(vocab_file, merge_file)  # tokenizers' own reading of the files
    for text in texts[:5] + ["The for statement is used to iterate over the elements of a sequence."]:
        ids = tokenizer.tokenize(text)
        assert ids == reference.encode(text).ids
        assert len(ids) < 0.6 * len(text.encode("utf-8"))  # merges learned: well under one token per byte
        assert tokenizer.detokenize(ids) == text
