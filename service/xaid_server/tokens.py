"""Text to token ids with a model's vocabulary, and token ids back to readable tokens.

Tokenisation is deliberately simple and documented: lower-cased runs of letters, digits and
apostrophes, and every other non-space character on its own. Unknown words map to the model's
unknown id; rows are truncated to `max_length` and padded with the pad id to a common length
(the model's fixed sequence length when it has one, else the longest row).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.model_config import TextConfig

TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks."""
    return TOKEN.findall(text.lower())


def encode(
    texts: Sequence[str], config: TextConfig | None, length: int = -1
) -> tuple[np.ndarray, list[list[str]]]:
    """int64 ids [rows, L] and each row's tokens (the words as written, without the padding).

    `length` > 0 is the model's fixed sequence length; otherwise L is the longest row.
    """
    if config is None:
        raise FailedPrecondition(
            "text: the model has no vocabulary (config.yaml `text:`); send token ids in inputs",
            field="text",
        )
    rows: list[list[str]] = []
    for i, text in enumerate(texts):
        words = tokenize(text)[: config.max_length]
        if not words:
            raise InvalidArgument(f"text[{i}]: no tokens in {text!r}", field=f"text[{i}]")
        if length > 0:
            words = words[:length]
        rows.append(words)
    width = length if length > 0 else max(len(r) for r in rows)
    ids = np.full((len(rows), width), config.pad_id, dtype=np.int64)
    index = config.index
    for row, words in enumerate(rows):
        ids[row, : len(words)] = [index.get(w, config.unk_id) for w in words]
    return ids, rows


def names(ids: np.ndarray, config: TextConfig | None) -> list[list[str]]:
    """The vocabulary entry of each id ([rows, L]); the id itself without a vocabulary."""
    vocabulary = config.vocabulary if config is not None else []
    return [
        [vocabulary[i] if 0 <= i < len(vocabulary) else str(i) for i in row.tolist()]
        for row in ids.reshape(len(ids), -1)
    ]
