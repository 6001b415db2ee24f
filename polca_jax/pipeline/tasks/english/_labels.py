"""Automatic cluster labels for the English experiment (the paper's §5.1 and Appendix E.2; digest §2.3).

The paper POS-tags each target token and the 3 tokens before it with spaCy; at each of these 4 offsets a cluster's
label is the smallest set of tags such that at least 70% of its members carry one of them, and a label is "simple"
when no offset needs more than 2 tags, not counting padding. (Per offset: a total of 2 over 4 offsets would be
impossible whenever more than 2 offsets are unpadded, since each needs at least one tag.)

A tagger maps a context of decoded token strings (``tokenizer.token_texts``) and a position to a set of tags.
``builtin_tags`` needs no model; ``spacy_tags`` adds spaCy part-of-speech tags (``pos:NOUN``, ``pos:ADP``, ...) when
spaCy and an English model are installed (``default_tagger`` picks it then). Tags of ``builtin_tags`` (a token can
carry several):

- ``tok:TEXT``: the token text with one leading space removed, lowercased (``" The"`` -> ``tok:the``).
- ``space``: starts with a space (the token begins a word).
- ``word``: letters only, ignoring a leading space.
- ``continuation``: starts with a letter or digit right after a token that ends in one (inside a word split into
  several tokens).
- ``capitalized``: the first character after a leading space is an uppercase letter.
- ``digit``: decimal digits only, ignoring a leading space.
- ``punct``: Unicode punctuation only (categories P*), ignoring surrounding whitespace.
- ``newline``: contains a newline.
- ``whitespace``: whitespace only.
- ``repeated``: the same token text occurs earlier in the context.
- ``eot``: the ``END_OF_TEXT`` document separator.
- ``bos``: the first token of the context.

``tag_tokens`` gives ``none`` (``NO_TOKEN``, the paper's <PAD>) at offsets before the start of the context.
"""

import dataclasses
import functools
import importlib.util
import math
import operator
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from polca_jax.pipeline.tasks.english._tokenizer import END_OF_TEXT

NO_TOKEN = "none"
Tagger = Callable[[Sequence[str], int], frozenset[str]]
"""``tagger(context_texts, position) -> tags`` of the token at ``position``."""

_NO_TOKEN_TAGS = frozenset({NO_TOKEN})
_SPECIFIC_PREFIXES = ("tok:", "pos:")  # tie-break order among equally good tags: token, then part of speech, then rest


def builtin_tags(context_texts: Sequence[str], position: int) -> frozenset[str]:
    """Tags of the token at ``position`` of a context of decoded token strings (vocabulary: module docstring)."""
    position = _checked_position(context_texts, position)
    text = context_texts[position]
    bare = text[1:] if text.startswith(" ") else text
    stripped = text.strip()
    checks = {
        "space": text.startswith(" "),
        "word": bare.isalpha(),
        "continuation": position > 0 and text[:1].isalnum() and context_texts[position - 1][-1:].isalnum(),
        "capitalized": bare[:1].isupper(),
        "digit": bare.isdecimal(),
        "punct": bool(stripped) and all(unicodedata.category(c).startswith("P") for c in stripped),
        "newline": "\n" in text,
        "whitespace": bool(text) and text.isspace(),
        "repeated": any(earlier == text for earlier in context_texts[:position]),
        "eot": text == END_OF_TEXT,
        "bos": position == 0,
    }
    return frozenset([f"tok:{(bare or text).lower()}"] + [tag for tag, holds in checks.items() if holds])


@functools.cache
def spacy_pipeline(model: str = "en_core_web_sm"):
    """The installed spaCy pipeline ``model``, or None if spaCy or the model is missing (nothing is downloaded)."""
    if importlib.util.find_spec("spacy") is None:
        return None
    try:
        return importlib.import_module("spacy").load(model)
    except (OSError, ImportError, ValueError):  # OSError: model not installed; the others: incompatible versions
        return None


def spacy_tags(nlp, context_texts: Sequence[str], position: int) -> frozenset[str]:
    """``builtin_tags`` plus ``pos:TAG`` for each spaCy token of ``nlp`` overlapping the token's characters.

    Use as ``tagger=functools.partial(spacy_tags, nlp)``. The context is parsed once (cached) with ``END_OF_TEXT``
    read as a paragraph break.
    """
    return builtin_tags(context_texts, position) | _spacy_pos(nlp, tuple(context_texts))[position]


def default_tagger() -> Tagger:
    """``spacy_tags`` with ``spacy_pipeline()`` if that is available, else ``builtin_tags``."""
    nlp = spacy_pipeline()
    return builtin_tags if nlp is None else functools.partial(spacy_tags, nlp)


def tag_tokens(
    contexts_texts: np.ndarray, positions: np.ndarray, *, window: int = 4, tagger: Tagger = builtin_tags
) -> list[list[frozenset[str]]]:
    """Tags around each sample: ``out[i][j]`` tags the token ``j`` places before sample ``i``'s token (j < window).

    ``contexts_texts`` is str[n, L] (decoded tokens of each context); ``positions`` int[m, 2] holds rows
    ``(context index, token position)``. Offset 0 is the sample's own (target) token; offsets before the start of the
    context get ``{NO_TOKEN}``.
    """
    contexts_texts = np.asarray(contexts_texts, dtype=object)
    if contexts_texts.ndim != 2:
        raise ValueError(f"contexts_texts must have shape [n, L], got {contexts_texts.shape}")
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must have shape [m, 2] (context index, position), got {positions.shape}")
    if positions.size and not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    for column, name in enumerate(("context index", "position")):
        size = contexts_texts.shape[column]
        if positions.size and (positions[:, column].min() < 0 or positions[:, column].max() >= size):
            raise ValueError(f"positions: every {name} must lie in [0, {size - 1}]")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive int, got {window!r}")
    rows: dict[int, tuple[str, ...]] = {}
    tags = []
    for context, position in positions.tolist():
        row = rows.setdefault(context, tuple(contexts_texts[context]))
        tags.append([tagger(row, position - j) if position >= j else _NO_TOKEN_TAGS for j in range(window)])
    return tags


@dataclasses.dataclass(frozen=True)
class ClusterLabel:
    """A cluster's automatic label: per offset (target, −1, −2, ...) the chosen tags and the share they cover."""

    positions: tuple[tuple[str, ...], ...]
    """The chosen tags at each offset, in the order they were picked."""
    coverage: tuple[float, ...]
    """Fraction of the members carrying at least one chosen tag, per offset."""
    simple: bool
    """Whether every offset needs at most ``max_simple_tags`` tags, not counting ``NO_TOKEN``."""
    text: str
    """Readable form, e.g. ``target ∈ {tok:of} · −1 ∈ {word}``."""

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return {
            "positions": [list(tags) for tags in self.positions],
            "coverage": list(self.coverage),
            "simple": self.simple,
            "text": self.text,
        }


def label_cluster(
    member_tags: list[list[frozenset[str]]], *, coverage: float = 0.7, max_simple_tags: int = 2
) -> ClusterLabel:
    """The paper's label of a cluster from its members' tags (``tag_tokens`` output restricted to the cluster).

    At each offset the label is a small set of tags such that at least ``coverage`` of the members carry one of them.
    The smallest such set is a set-cover problem (NP-hard), so it is built greedily: take the tag that covers the
    most uncovered members, ties broken by tag name, until the coverage is reached. The last pick is the most
    specific tag that reaches it: among all tags that would, the one the fewest members carry (then ``tok:`` before
    ``pos:`` before other tags, then by name). This keeps the greedy set's size and prefers ``{tok:of}`` over
    ``{space}`` for a cluster of " of" tokens.
    """
    if not isinstance(member_tags, list) or not member_tags:
        raise ValueError("member_tags must be a non-empty list (one entry per cluster member)")
    num_offsets = len(member_tags[0])
    for i, tags in enumerate(member_tags):
        if not isinstance(tags, (list, tuple)) or len(tags) != num_offsets or num_offsets == 0:
            raise ValueError(f"member {i}: expected a list of {max(num_offsets, 1)} tag sets (one per offset)")
        if not all(isinstance(t, (set, frozenset)) and t for t in tags):
            raise ValueError(f"member {i}: every offset needs a non-empty set of tags")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    if isinstance(max_simple_tags, bool) or not isinstance(max_simple_tags, int) or max_simple_tags < 0:
        raise ValueError(f"max_simple_tags must be a non-negative int, got {max_simple_tags!r}")
    covers = [_greedy_cover([tags[j] for tags in member_tags], coverage) for j in range(num_offsets)]
    positions = tuple(chosen for chosen, _ in covers)
    text = " · ".join(
        f"{_offset_name(j)} ∈ {{{', '.join(tag.replace(chr(10), '⏎') for tag in chosen)}}}"
        for j, chosen in enumerate(positions)
    )
    return ClusterLabel(
        positions=positions,
        coverage=tuple(share for _, share in covers),
        simple=all(sum(tag != NO_TOKEN for tag in chosen) <= max_simple_tags for chosen in positions),
        text=text,
    )


def top_tokens(texts: Sequence[str], k: int = 10) -> list[tuple[str, int]]:
    """The ``k`` most frequent strings of ``texts`` with their counts, most frequent first (ties by text)."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    counts = Counter(str(text) for text in texts)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]


def format_context(context_texts: Sequence[str], position: int, *, before: int = 12, after: int = 2) -> str:
    """The ``before`` tokens, the token at ``position`` marked ``⟦token⟧``, and ``after`` tokens; newlines as ``⏎``."""
    position = _checked_position(context_texts, position)
    for name, value in (("before", before), ("after", after)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    texts = [str(text) for text in context_texts]
    shown = (
        "".join(texts[max(0, position - before) : position])
        + f"⟦{texts[position]}⟧"
        + "".join(texts[position + 1 : position + 1 + after])
    )
    return shown.replace("\n", "⏎")


def _greedy_cover(member_sets: list[frozenset[str]], coverage: float) -> tuple[tuple[str, ...], float]:
    """Greedy cover of ``coverage`` of the members: (chosen tags, covered fraction); see ``label_cluster``."""
    needed = math.ceil(coverage * len(member_sets) - 1e-9)  # tolerance: 0.7 * n may land just above an integer
    carriers = defaultdict(set)
    for i, tags in enumerate(member_sets):
        for tag in tags:
            carriers[tag].add(i)
    covered: set[int] = set()
    chosen: list[str] = []
    while len(covered) < needed:
        gains = {tag: len(members - covered) for tag, members in carriers.items() if tag not in chosen}
        finishing = [tag for tag, gain in gains.items() if gain >= needed - len(covered)]
        if finishing:
            tag = min(finishing, key=lambda t: (len(carriers[t]), _specificity(t), t))
        else:
            tag = min(gains, key=lambda t: (-gains[t], t))
        chosen.append(tag)
        covered |= carriers[tag]
    return tuple(chosen), len(covered) / len(member_sets)


def _specificity(tag: str) -> int:
    """0 for ``tok:`` tags, 1 for ``pos:`` tags, 2 for the rest."""
    prefixes = [rank for rank, prefix in enumerate(_SPECIFIC_PREFIXES) if tag.startswith(prefix)]
    return prefixes[0] if prefixes else len(_SPECIFIC_PREFIXES)


@functools.lru_cache(maxsize=64)
def _spacy_pos(nlp, texts: tuple[str, ...]) -> tuple[frozenset[str], ...]:
    """``pos:TAG`` tags of each token of a context, aligned to spaCy's tokens by character offsets."""
    texts = tuple("\n\n" if text == END_OF_TEXT else text for text in texts)
    ends = np.cumsum([len(text) for text in texts])
    starts = ends - np.array([len(text) for text in texts])
    tags = [set() for _ in texts]
    for token in nlp("".join(texts)):
        first = np.searchsorted(ends, token.idx, side="right")  # first token ending after spaCy's token starts
        stop = np.searchsorted(starts, token.idx + len(token.text), side="left")  # tokens starting before it ends
        for i in range(first, stop):
            tags[i].add(f"pos:{token.pos_}")
    return tuple(frozenset(t) for t in tags)


def _offset_name(offset: int) -> str:
    return "target" if offset == 0 else f"−{offset}"


def _checked_position(context_texts: Sequence[str], position: int) -> int:
    try:
        position = operator.index(position)
    except TypeError as error:
        raise ValueError(f"position must be an int, got {position!r}") from error
    if not 0 <= position < len(context_texts):
        raise ValueError(f"position {position} is outside the context of {len(context_texts)} tokens")
    return position
