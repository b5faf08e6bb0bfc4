"""Short procedurally generated reviews with a known sentiment, for the `text` demo model.

Sentences come from templates: a subject, an optional intensifier, a sentiment word, and
sometimes a negation ("not", "never") that flips the sentiment, a second clause of the same
polarity, or opinion filler that carries no sentiment. The label is fixed by the rules, so fresh
sentences from any seed are correctly labelled test data, and the sentiment words are the tokens
an explanation should point at.
"""

from __future__ import annotations

import numpy as np

from xaid_server.tokens import tokenize

LABELS = ("negative", "positive")
PAD = "<pad>"
UNK = "<unk>"

POSITIVE = (
    "good", "great", "excellent", "wonderful", "amazing", "fantastic",
    "lovely", "delightful", "superb", "enjoyable", "brilliant", "pleasant",
)  # fmt: skip
NEGATIVE = (
    "bad", "terrible", "awful", "horrible", "boring", "dull",
    "poor", "disappointing", "dreadful", "mediocre", "annoying", "weak",
)  # fmt: skip
SUBJECTS = (
    "the movie", "the film", "the plot", "the acting", "the soundtrack", "the ending",
    "this book", "the food", "the service", "the hotel", "the story", "the cast",
)  # fmt: skip
INTENSIFIERS = ("", "", "very", "really", "truly", "quite", "extremely", "so")
NEGATIONS = ("not", "never")
VERBS = ("was", "is", "seemed", "felt")
OPENERS = ("", "", "", "honestly ,", "overall ,", "i think", "to be fair ,", "in short ,")
CLOSERS = ("", "", "", "in my opinion", "to me", "for sure", "all in all")


def vocabulary() -> list[str]:
    """Every token the generator can emit, after the pad and unknown tokens (ids 0 and 1)."""
    words: set[str] = set()
    for group in (POSITIVE, NEGATIVE, SUBJECTS, INTENSIFIERS, NEGATIONS, VERBS, OPENERS, CLOSERS):
        for phrase in group:
            words.update(tokenize(phrase))
    words.update(tokenize("and , ."))
    return [PAD, UNK, *sorted(words)]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _clause(rng: np.random.Generator, positive: bool) -> str:
    """'<subject> <verb> [<negation>] [<intensifier>] <word>' with the given sentiment."""
    negated = bool(rng.random() < 0.3)
    words = POSITIVE if positive != negated else NEGATIVE
    parts = [_pick(rng, SUBJECTS), _pick(rng, VERBS)]
    if negated:
        parts.append(_pick(rng, NEGATIONS))
    parts += [_pick(rng, INTENSIFIERS), _pick(rng, words)]
    return " ".join(p for p in parts if p)


def generate(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """`n` sentences and their labels (0 negative, 1 positive), half of each on average."""
    sentences: list[str] = []
    labels = rng.integers(0, 2, n)
    for label in labels:
        positive = bool(label)
        clauses = [_clause(rng, positive)]
        if rng.random() < 0.25:
            clauses.append(_clause(rng, positive))
        parts = [_pick(rng, OPENERS), " and ".join(clauses), _pick(rng, CLOSERS)]
        sentences.append(" ".join(p for p in parts if p) + " .")
    return sentences, labels.astype(np.int64)
