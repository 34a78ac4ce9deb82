"""Undo the tokenization of the WikiText and PTB corpora before BPE sees the text.

WikiText-103's test file is *tokenized* text: ``"1 @,@ 000 km ( 620 mi )"``,
``"the team 's"``. GPT-2 was trained on natural text, so Megatron-LM
(``tasks/zeroshot_gpt/detokenizer.py``) rewrites the file into
``"1,000 km (620 mi)"`` and ``"the team's"`` first, then counts the perplexity
per BPE token and *adjusts* it to the file's own word count
(:mod:`lessons_pkg.evaluation.metrics`). The rules below are Megatron's, in
its order (the order matters: ``" @-@ "`` before ``" : "``-style spacing).

Megatron picks the detokenizer from the file name: a path containing ``ptb``,
``wiki`` or ``lambada`` (the last one changes nothing). :func:`get_detokenizer`
does the same and returns the identity for any other name.
"""
from __future__ import annotations

import re
from typing import Callable

# (old, new) literal replacements and ("re", pattern, replacement) regular expressions, applied in order
_WIKITEXT_RULES: list[tuple] = [
    ("s '", "s'"),                                      # contractions: "players '" -> "players'"
    ("re", r"/' [0-9]/", r"/'[0-9]/"),                  # (Megatron's rule, as written: matches a literal "/' 9/")
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),     # number separators: 1 @,@ 000 -> 1,000
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),            # "( 620 mi )" -> "(620 mi)"
    ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # section titles
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]

_PTB_RULES: list[tuple] = [
    (" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), (" N ", "1 "), ("$ 1", "$1"), ("# 1", "#1"),
]


def _apply(rules: list[tuple], text: str) -> str:
    for rule in rules:
        if rule[0] == "re":
            text = re.sub(rule[1], rule[2], text)
        else:
            text = text.replace(rule[0], rule[1])
    return text


def wikitext_detokenizer(text: str) -> str:
    """WikiText's tokenized text -> natural text (Megatron's rules)."""
    return _apply(_WIKITEXT_RULES, text)


def ptb_detokenizer(text: str) -> str:
    """Penn Treebank's tokenized text -> natural text (Megatron's rules)."""
    return _apply(_PTB_RULES, text)


def identity_detokenizer(text: str) -> str:
    return text


_BY_NAME = {"ptb": ptb_detokenizer, "wiki": wikitext_detokenizer, "lambada": identity_detokenizer}


def get_detokenizer(path: str) -> tuple[str, Callable[[str], str]]:
    """``(name, function)`` for ``path``: the first of ptb / wiki / lambada its name contains, else none."""
    for key, fn in _BY_NAME.items():
        if key in path:
            return key, fn
    return "none", identity_detokenizer
