""" "The same text", decided in one place: :func:`text_key`.

It means what the model sees: NFKC (full-width = half-width), whitespace, and the tokenizer's
lowercasing; with the model's tokenizer at hand, equal token ids. Every caller uses it: within
a file (duplicates, conflicts), across files (:mod:`ftctl.data.reconcile`), ``data generate``,
``harvest``, ``import-review`` and eval's leakage check.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

TextKey = str | tuple[int, ...]


def _canonical(text: str) -> str:
    """NFKC (full-width letters, digits and punctuation become half-width: 'ＡＢ１？' ==
    'AB1?'), whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_key(text: str, tokenizer=None) -> TextKey:
    """What decides that two texts are the same, everywhere in ftctl: equal keys.

    Without a tokenizer: the NFKC form, whitespace collapsed, lowercased (the Chinese BERT
    tokenizers, chinese-roberta-wwm-ext's included, lowercase). With the model's tokenizer:
    the token ids of the NFKC form, so two texts are one exactly when the model gets the same
    input (its own lowercasing, [UNK]s and whitespace handling included).
    """
    return text_keys([text], tokenizer)[0]


def text_keys(texts: Sequence[str], tokenizer=None) -> list[TextKey]:
    """:func:`text_key` of many texts (one tokenizer call for all of them)."""
    forms = [_canonical(t) for t in texts]
    if tokenizer is None:
        return [f.lower() for f in forms]
    if not forms:
        return []
    ids = tokenizer(forms, add_special_tokens=False)["input_ids"]
    return [tuple(i) for i in ids]
