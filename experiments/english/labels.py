"""Automatic cluster labels for the English experiment (the paper's §5.1 and Appendix E.2; digest §2.3).

The paper POS-tags each target token and the 3 tokens before it with spaCy; at each of these 4 offsets a cluster's
label is the smallest set of tags such that at least 70% of its members carry one of them, and a label is "simple"
when no offset needs more than 2 tags, not counting padding. (Per offset: a total of 2 over 4 offsets would be
impossible whenever more than 2 offsets are unpadded, since each needs at least one tag.)

**Informative labels.** A label that nearly every token would get (``target ∈ {content word}``) says nothing about
the cluster, however few tags it has. So ``label_cluster`` also compares, at each offset, the share of the cluster
that its chosen tags cover with the share of *all* evaluation samples that they cover (the base rate, from
``base_rates``). An offset is *informative* when the cluster is enriched at least ``min_enrichment`` times
(default ``MIN_ENRICHMENT`` = 2): then at least half of the members that carry the label carry it beyond what the
base rate predicts, and since the cluster coverage is at most 100%, tags that cover more than half of all tokens can
never be informative. An offset whose chosen tags include padding (``NO_TOKEN``) is never informative. Given base
rates, a label is simple only if it has at most ``max_simple_tags`` tags per offset (the paper's rule) *and* at least
one informative offset; without them, the paper's rule alone.

A tagger maps a context of decoded token strings (``tokenizer.token_texts``) and a position to a set of tags.
``builtin_tags`` needs no model; ``spacy_tags`` adds spaCy part-of-speech tags (``pos:NOUN``, ``pos:ADP``, ...) when
spaCy and an English model are installed (``default_tagger`` picks it then). ``builtin_tags`` gives each token its
``tok:`` tag, one *class* (several ``punct:`` kinds for a token of several punctuation marks) and optional flags.
Tokens are byte-level BPE pieces, often with a leading space (``" the"``). A *word* is a run of letters or digits:
its first piece starts it (after a space, punctuation, a newline or the start of the context) and the pieces
attached to it without a space are its continuations. The word is read from all its pieces, so the first piece of
``" in" "j" "ury"`` is a content word, not a preposition; a word cut off by the end of the context is read as far as
it goes. The vocabulary:

- ``tok:TEXT``: the token text with one leading space removed, lowercased (``" The"`` -> ``tok:the``).

Classes (the first piece of a word; the closed lists are ``CLOSED_CLASSES``, lowercase English, disjoint):

- ``class:determiner`` (the, a, this, every, some, ...), ``class:pronoun`` (personal, possessive, reflexive and
  indefinite: he, its, themselves, something, ...), ``class:preposition`` (of, in, to, with, after, than, ...),
  ``class:conjunction`` (coordinating: and, or, but, nor), ``class:subordinator`` (that, if, because, while, ...),
  ``class:auxiliary`` (forms of be, have, do; also a negated stem such as ``don`` before ``'t``),
  ``class:modal`` (can, would, must, ...; also ``won``, ``couldn``, ... before ``'t``), ``class:negation`` (not,
  never, the clitic ``'t``), ``class:wh-word`` (who, which, when, how, ...), ``class:adverb`` (common adverbs of
  degree, focus, time and place: very, also, only, then, there, ...), ``class:clitic`` (``'s``; ``'re``, ``'ve``,
  ``'m``, ``'d`` are auxiliaries and ``'ll`` a modal).
- ``class:name``: a word of letters in no closed list, capitalised in mid-sentence (most often a proper noun).
- ``class:content-word``: any other word of letters in no closed list (noun, verb, adjective, adverb, or a
  capitalised one that starts a sentence).
- ``number:digits`` (a word starting with a digit: ``" 1999"``, ``"1990s"``), ``number:word`` (one, twenty,
  hundred, million, ...), ``number:separator`` (a lone ``.`` or ``,`` between digits: ``3.5``, ``1,000``).
- ``continuation``: a piece after the first of a word split into several tokens (``"ing"`` after ``" play"``).
- ``punct:sentence-end`` (``. ! ? …``), ``punct:comma``, ``punct:colon`` (``: ;``), ``punct:quote`` (straight,
  curly and angle quotes, backtick), ``punct:apostrophe`` (a lone ``'`` or ``’`` between letters: ``O'Brien``),
  ``punct:bracket`` (``( ) [ ] { }``), ``punct:dash`` (hyphens and dashes), ``punct:other`` (any other punctuation
  or symbol: ``% $ & / +`` ...). A token holds only punctuation and spaces; each kind it holds is a tag.
- ``newline`` (contains a newline), ``whitespace`` (spaces or tabs only), ``end-of-text`` (the ``END_OF_TEXT``
  document separator), ``other`` (anything else, e.g. part of a multi-byte character decoded as ``�``).

Flags:

- ``capitalized:sentence-start`` / ``capitalized:mid-sentence``: the first piece of a word starting with an
  uppercase letter, after a sentence end (``. ! ? …``, a newline, ``END_OF_TEXT`` or the start of the context,
  looking back past quotes, brackets and spaces) or not. Abbreviations (``Mr.``) look like sentence ends.
- ``repeated``: the same token text occurs earlier in the context.

``tag_tokens`` gives ``none`` (``NO_TOKEN``, the paper's <PAD>) at offsets before the start of the context.
"""

import dataclasses
import functools
import importlib.util
import math
import operator
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from polca_jax.errors import PolcaError
from experiments.english.tokenizer import END_OF_TEXT

NO_TOKEN = "none"
Tagger = Callable[[Sequence[str], int], frozenset[str]]
"""``tagger(context_texts, position) -> tags`` of the token at ``position``."""

MIN_ENRICHMENT = 2.0
"""Default of ``label_cluster``'s ``min_enrichment``: an offset is informative when its chosen tags cover at least
this many times as large a share of the cluster as of all samples (module docstring)."""

_NO_TOKEN_TAGS = frozenset({NO_TOKEN})
_SPECIFIC_PREFIXES = ("tok:", "pos:")  # tie-break order among equally good tags: token, then part of speech, then rest

CLOSED_CLASSES: dict[str, frozenset[str]] = {
    "determiner": frozenset(
        "a an the this these those each every either neither another some any no all both such several many much "
        "few enough".split()),
    "pronoun": frozenset(
        "i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its "
        "itself we us our ours ourselves they them their theirs themselves someone somebody something anyone "
        "anybody anything everyone everybody everything nobody nothing none".split()),
    "preposition": frozenset(
        "of in on at by for with from to into onto upon about above across after against along amid among around "
        "as before behind below beneath beside besides between beyond despite down during except inside near off "
        "out outside over per since than through throughout till toward towards under underneath unlike until up "
        "via within without".split()),
    "conjunction": frozenset("and or but nor".split()),
    "subordinator": frozenset("that if because although though while whilst whether unless whereas lest".split()),
    "auxiliary": frozenset("be am is are was were been being have has had having do does did".split()),
    "modal": frozenset("can could will would shall should may might must ought cannot".split()),
    "negation": frozenset("not never".split()),
    "wh-word": frozenset(
        "who whom whose what which when where why how whatever whoever whichever wherever whenever".split()),
    "adverb": frozenset(
        "very too so also just only even still already again then now here there however thus therefore quite "
        "rather almost really more most less least often always sometimes usually ever soon yet perhaps instead "
        "later once".split()),
}
"""The closed word classes of ``builtin_tags`` (``class:NAME``): small lists of lowercase English words, disjoint
(a word that can be several, such as ``that`` or ``as``, is in the list of its most frequent use in news text)."""

NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion trillion dozen".split())
"""Cardinal number words (``number:word``)."""

FUNCTION_CLASSES = tuple(f"class:{name}" for name in CLOSED_CLASSES) + ("class:clitic",)
"""The class tags of function words (closed classes and clitics)."""

_NEGATED_STEMS = {  # the word before a clitic 't ("don" "'t")
    **dict.fromkeys("don doesn didn isn aren wasn weren hasn haven hadn ain".split(), "auxiliary"),
    **dict.fromkeys("can couldn won wouldn shouldn mustn mightn needn shan".split(), "modal"),
}
_CLITICS = {"s": "clitic", "t": "negation", "re": "auxiliary", "ve": "auxiliary", "m": "auxiliary",
            "d": "auxiliary", "ll": "modal"}
_APOSTROPHES = "'’"
_PUNCT_KINDS = {
    **dict.fromkeys(".!?…", "sentence-end"), ",": "comma", **dict.fromkeys(":;", "colon"),
    **dict.fromkeys("\"'`“”‘’«»„‹›", "quote"), **dict.fromkeys("()[]{}", "bracket"),
    **dict.fromkeys("-‐‑‒–—―", "dash"),
}
_SENTENCE_ENDS = ".!?…"
_QUOTES_AND_BRACKETS = "\"'`“”‘’«»„‹›()[]{}"  # looked back past to decide whether a word starts a sentence
_CLITIC_TOKEN = re.compile(r"[" + _APOSTROPHES + r"](s|t|re|ve|m|d|ll)", re.IGNORECASE)


def builtin_tags(context_texts: Sequence[str], position: int) -> frozenset[str]:
    """Tags of the token at ``position`` of a context of decoded token strings (vocabulary: module docstring)."""
    position = _checked_position(context_texts, position)
    texts = [str(text) for text in context_texts]
    text = texts[position]
    bare = text[1:] if text.startswith(" ") else text
    tags = {f"tok:{(bare or text).lower()}"} | _token_class(texts, position)
    if bare[:1].isupper() and not _is_continuation(texts, position):
        tags.add("capitalized:sentence-start" if _starts_sentence(texts, position) else "capitalized:mid-sentence")
    if any(earlier == text for earlier in texts[:position]):
        tags.add("repeated")
    return frozenset(tags)


def _token_class(texts: list[str], position: int) -> set[str]:
    """The class tags of a token (one, or one per punctuation kind; module docstring)."""
    text = texts[position]
    bare = text[1:] if text.startswith(" ") else text
    stripped = text.strip()
    if text == END_OF_TEXT:
        return {"end-of-text"}
    if "\n" in text:
        return {"newline"}
    if not stripped:
        return {"whitespace"} if text else {"other"}
    if _is_continuation(texts, position):
        return {"continuation"}
    if _CLITIC_TOKEN.fullmatch(bare) or (  # "'s", or "s" after a lone "'" when the clitic is split in two pieces
            text.lower() in _CLITICS and position > 0 and texts[position - 1] in tuple(_APOSTROPHES)):
        return {f"class:{_CLITICS[bare[-2:].lstrip(_APOSTROPHES).lower()]}"}
    if bare[:1].isalnum():
        return {_word_class(texts, position)}
    if all(unicodedata.category(c)[0] in "PS" and c != "\ufffd" for c in stripped):
        if stripped in (".", ",") and text == stripped and _between_digits(texts, position):
            return {"number:separator"}
        if stripped in tuple(_APOSTROPHES) and text == stripped and _between_letters(texts, position):
            return {"punct:apostrophe"}
        return {f"punct:{_PUNCT_KINDS.get(c, 'other')}" for c in stripped}
    return {"other"}


def _word_class(texts: list[str], position: int) -> str:
    """The class of the word that starts at ``position``, read from all its pieces."""
    pieces = [texts[position].lstrip(" ")]
    following = position + 1
    while following < len(texts) and _is_continuation(texts, following):
        pieces.append(texts[following])
        following += 1
    word = "".join(pieces)
    lower = word.lower()
    if word[:1].isdigit():
        return "number:digits"
    if following < len(texts) and lower in _NEGATED_STEMS and texts[following].lower() in ("'t", "’t"):
        return f"class:{_NEGATED_STEMS[lower]}"
    if lower in NUMBER_WORDS:
        return "number:word"
    closed = [name for name, words in CLOSED_CLASSES.items() if lower in words]
    if closed:
        return f"class:{closed[0]}"
    if word[:1].isupper() and not _starts_sentence(texts, position):
        return "class:name"
    return "class:content-word"


def _is_continuation(texts: list[str], position: int) -> bool:
    """Whether the token continues a word: a letter or digit first, right after a letter or digit."""
    return position > 0 and texts[position][:1].isalnum() and texts[position - 1][-1:].isalnum()


def _starts_sentence(texts: list[str], position: int) -> bool:
    """Whether the token follows a sentence end, a newline, END_OF_TEXT or the context start (past quotes,
    brackets and spaces)."""
    before = position - 1
    while before >= 0 and texts[before] != END_OF_TEXT and "\n" not in texts[before] and all(
            c in _QUOTES_AND_BRACKETS or c.isspace() for c in texts[before]):
        before -= 1
    if before < 0 or texts[before] == END_OF_TEXT or "\n" in texts[before]:
        return True
    return texts[before].rstrip().rstrip(_QUOTES_AND_BRACKETS)[-1:] in tuple(_SENTENCE_ENDS)  # also '."' and '.)'


def _between_digits(texts: list[str], position: int) -> bool:
    return (0 < position < len(texts) - 1 and texts[position - 1][-1:].isdigit()
            and texts[position + 1][:1].isdigit())


def _between_letters(texts: list[str], position: int) -> bool:
    return (0 < position < len(texts) - 1 and texts[position - 1][-1:].isalpha()
            and texts[position + 1][:1].isalpha())


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
        raise PolcaError(f"contexts_texts must have shape [n, L], got {contexts_texts.shape}")
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise PolcaError(f"positions must have shape [m, 2] (context index, position), got {positions.shape}")
    if positions.size and not np.issubdtype(positions.dtype, np.integer):
        raise PolcaError(f"positions must be integers, got dtype {positions.dtype}")
    for column, name in enumerate(("context index", "position")):
        size = contexts_texts.shape[column]
        if positions.size and (positions[:, column].min() < 0 or positions[:, column].max() >= size):
            raise PolcaError(f"positions: every {name} must lie in [0, {size - 1}]")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise PolcaError(f"window must be a positive int, got {window!r}")
    rows: dict[int, tuple[str, ...]] = {}
    tags = []
    for context, position in positions.tolist():
        row = rows.setdefault(context, tuple(contexts_texts[context]))
        tags.append([tagger(row, position - j) if position >= j else _NO_TOKEN_TAGS for j in range(window)])
    return tags


class BaseRates:
    """Which of all samples carry each tag at each offset: the population that ``label_cluster`` compares a
    cluster's label with. Build it once with ``base_rates`` from every sample's tags (``tag_tokens`` output)."""

    def __init__(self, all_tags: list[list[frozenset[str]]]):
        num_offsets = _check_tag_lists(all_tags, "all_tags", "sample")
        self.num_samples = len(all_tags)
        self.num_offsets = num_offsets
        carriers = [defaultdict(list) for _ in range(num_offsets)]
        for i, sample in enumerate(all_tags):
            for j, tags in enumerate(sample):
                for tag in tags:
                    carriers[j][tag].append(i)
        self._carriers = [{tag: np.asarray(indices) for tag, indices in offset.items()} for offset in carriers]

    def coverage(self, offset: int, tags) -> float:
        """Share of all samples carrying at least one of ``tags`` at ``offset`` (0 = target, 1 = the token before)."""
        if not 0 <= offset < self.num_offsets:
            raise PolcaError(f"offset {offset} is outside the {self.num_offsets} offsets of these base rates")
        carried = np.zeros(self.num_samples, dtype=bool)
        for tag in tags:
            carried[self._carriers[offset].get(tag, [])] = True
        return float(carried.mean())

    def rates(self, offset: int) -> dict[str, float]:
        """Share of all samples carrying each tag at ``offset``, most frequent first (ties by tag)."""
        if not 0 <= offset < self.num_offsets:
            raise PolcaError(f"offset {offset} is outside the {self.num_offsets} offsets of these base rates")
        rates = {tag: len(indices) / self.num_samples for tag, indices in self._carriers[offset].items()}
        return dict(sorted(rates.items(), key=lambda item: (-item[1], item[0])))


def base_rates(all_tags: list[list[frozenset[str]]]) -> BaseRates:
    """The base rates of every tag at every offset among all samples (``tag_tokens`` of every evaluation token)."""
    return BaseRates(all_tags)


@dataclasses.dataclass(frozen=True)
class ClusterLabel:
    """A cluster's automatic label: per offset (target, −1, −2, ...) the chosen tags and the share they cover."""

    positions: tuple[tuple[str, ...], ...]
    """The chosen tags at each offset, in the order they were picked."""
    coverage: tuple[float, ...]
    """Fraction of the members carrying at least one chosen tag, per offset."""
    simple: bool
    """``few_tags`` and, when base rates were given, at least one informative offset (module docstring)."""
    text: str
    """Readable form, e.g. ``target ∈ {tok:of} (80% vs 4%) · −1 ∈ {class:content-word} (90% vs 55%)``: the share of
    the cluster and, with base rates, of all samples that carry the chosen tags."""
    few_tags: bool = True
    """Whether every offset needs at most ``max_simple_tags`` tags, not counting ``NO_TOKEN`` (the paper's rule)."""
    base_coverage: tuple[float, ...] | None = None
    """Fraction of all samples carrying at least one chosen tag, per offset; None without base rates."""
    informative: tuple[bool, ...] | None = None
    """Per offset: no ``NO_TOKEN`` among the chosen tags and ``coverage >= min_enrichment * base_coverage``; None
    without base rates."""

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return {
            "positions": [list(tags) for tags in self.positions],
            "coverage": list(self.coverage),
            "base_coverage": None if self.base_coverage is None else list(self.base_coverage),
            "informative": None if self.informative is None else list(self.informative),
            "few_tags": self.few_tags,
            "simple": self.simple,
            "text": self.text,
        }


def label_cluster(
    member_tags: list[list[frozenset[str]]], *, coverage: float = 0.7, max_simple_tags: int = 2,
    base_rates: BaseRates | None = None, min_enrichment: float = MIN_ENRICHMENT,
) -> ClusterLabel:
    """The paper's label of a cluster from its members' tags (``tag_tokens`` output restricted to the cluster).

    At each offset the label is a small set of tags such that at least ``coverage`` of the members carry one of them.
    The smallest such set is a set-cover problem (NP-hard), so it is built greedily: take the tag that covers the
    most uncovered members, ties broken by tag name, until the coverage is reached. The last pick is the most
    specific tag that reaches it: among all tags that would, the one the fewest members carry (then ``tok:`` before
    ``pos:`` before other tags, then by name). This keeps the greedy set's size and prefers ``{tok:of}`` over
    ``{class:preposition}`` for a cluster of " of" tokens.

    ``base_rates`` (of all samples, from ``base_rates``): each offset's chosen tags are also measured on all samples,
    and the label is simple only if some offset is informative, i.e. enriched ``min_enrichment`` times (module
    docstring). Without it, simple is the paper's tag count alone.
    """
    num_offsets = _check_tag_lists(member_tags, "member_tags", "member")
    if not 0.0 < coverage <= 1.0:
        raise PolcaError(f"coverage must lie in (0, 1], got {coverage!r}")
    if isinstance(max_simple_tags, bool) or not isinstance(max_simple_tags, int) or max_simple_tags < 0:
        raise PolcaError(f"max_simple_tags must be a non-negative int, got {max_simple_tags!r}")
    if base_rates is not None:
        if not isinstance(base_rates, BaseRates):
            raise PolcaError(f"base_rates must come from base_rates(all_tags), got {type(base_rates).__name__}")
        if base_rates.num_offsets != num_offsets:
            raise PolcaError(f"base_rates has {base_rates.num_offsets} offsets, the members have {num_offsets}")
    if isinstance(min_enrichment, bool) or not isinstance(min_enrichment, (int, float)) or not min_enrichment >= 1:
        raise PolcaError(f"min_enrichment must be a number >= 1, got {min_enrichment!r}")
    covers = [_greedy_cover([tags[j] for tags in member_tags], coverage) for j in range(num_offsets)]
    positions = tuple(chosen for chosen, _ in covers)
    shares = tuple(share for _, share in covers)
    few_tags = all(sum(tag != NO_TOKEN for tag in chosen) <= max_simple_tags for chosen in positions)
    base = informative = None
    if base_rates is not None:
        base = tuple(base_rates.coverage(j, chosen) for j, chosen in enumerate(positions))
        informative = tuple(
            NO_TOKEN not in chosen and share >= min_enrichment * rate - 1e-12
            for chosen, share, rate in zip(positions, shares, base))
    parts = []
    for j, chosen in enumerate(positions):
        part = f"{_offset_name(j)} ∈ {{{', '.join(tag.replace(chr(10), '⏎') for tag in chosen)}}}"
        if base is not None:
            part += f" ({_percent(shares[j])} vs {_percent(base[j])})"
        parts.append(part)
    return ClusterLabel(
        positions=positions,
        coverage=shares,
        simple=few_tags and (informative is None or any(informative)),
        text=" · ".join(parts),
        few_tags=few_tags,
        base_coverage=base,
        informative=informative,
    )


def top_tokens(texts: Sequence[str], k: int = 10) -> list[tuple[str, int]]:
    """The ``k`` most frequent strings of ``texts`` with their counts, most frequent first (ties by text)."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise PolcaError(f"k must be a positive int, got {k!r}")
    counts = Counter(str(text) for text in texts)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]


def format_context(context_texts: Sequence[str], position: int, *, before: int = 12, after: int = 2) -> str:
    """The ``before`` tokens, the token at ``position`` marked ``⟦token⟧``, and ``after`` tokens; newlines as ``⏎``."""
    position = _checked_position(context_texts, position)
    for name, value in (("before", before), ("after", after)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PolcaError(f"{name} must be a non-negative int, got {value!r}")
    texts = [str(text) for text in context_texts]
    shown = (
        "".join(texts[max(0, position - before) : position])
        + f"⟦{texts[position]}⟧"
        + "".join(texts[position + 1 : position + 1 + after])
    )
    return shown.replace("\n", "⏎")


def _check_tag_lists(tag_lists, name: str, item: str) -> int:
    """The number of offsets of a list of per-offset tag sets (one entry per sample), checked."""
    if not isinstance(tag_lists, list) or not tag_lists:
        raise PolcaError(f"{name} must be a non-empty list (one entry per {item})")
    num_offsets = len(tag_lists[0]) if isinstance(tag_lists[0], (list, tuple)) else 0
    for i, tags in enumerate(tag_lists):
        if not isinstance(tags, (list, tuple)) or len(tags) != num_offsets or num_offsets == 0:
            raise PolcaError(f"{item} {i}: expected a list of {max(num_offsets, 1)} tag sets (one per offset)")
        if not all(isinstance(t, (set, frozenset)) and t for t in tags):
            raise PolcaError(f"{item} {i}: every offset needs a non-empty set of tags")
    return num_offsets


def _percent(share: float) -> str:
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


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
        raise PolcaError(f"position must be an int, got {position!r}") from error
    if not 0 <= position < len(context_texts):
        raise PolcaError(f"position {position} is outside the context of {len(context_texts)} tokens")
    return position
