import functools
import importlib.util
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from polca_jax.pipeline.tasks.english._labels import (
    NO_TOKEN,
    ClusterLabel,
    builtin_tags,
    default_tagger,
    format_context,
    label_cluster,
    spacy_pipeline,
    spacy_tags,
    tag_tokens,
    top_tokens,
)
from polca_jax.pipeline.tasks.english._tokenizer import END_OF_TEXT

CONTEXT = ["The", " cat", " sat", ".", "\n", "\n", "In", " 1990", ",", " the", " cat", "s", END_OF_TEXT, " (", "x"]


@pytest.mark.parametrize(
    "position, expected",
    [
        (0, {"tok:the", "bos", "capitalized", "word"}),
        (1, {"tok:cat", "space", "word"}),
        (3, {"tok:.", "punct"}),
        (4, {"tok:\n", "newline", "whitespace"}),
        (5, {"tok:\n", "newline", "whitespace", "repeated"}),
        (6, {"tok:in", "capitalized", "word"}),
        (7, {"tok:1990", "space", "digit"}),
        (9, {"tok:the", "space", "word"}),  # "The" at 0 is another token text: not repeated
        (10, {"tok:cat", "space", "word", "repeated"}),
        (11, {"tok:s", "word", "continuation"}),
        (12, {f"tok:{END_OF_TEXT}", "eot"}),
        (13, {"tok:(", "space", "punct"}),
    ],
)
def test_builtin_tags_of_a_hand_made_context(position, expected):
    assert builtin_tags(CONTEXT, position) == expected


def test_builtin_tags_accept_a_numpy_row_and_check_the_position():
    row = np.array(CONTEXT, dtype=object)
    assert builtin_tags(row, np.int64(10)) == builtin_tags(CONTEXT, 10)
    for position in (-1, len(CONTEXT)):
        with pytest.raises(ValueError, match=f"position {position} is outside the context of 15 tokens"):
            builtin_tags(CONTEXT, position)


def position_tagger(context, position):
    """Tags naming the context's first token and the position, to check which token each offset asks for."""
    return frozenset({f"{context[0]}@{position}"})


def test_tag_tokens_looks_back_from_each_sample():
    contexts = np.array([["a", "b", "c", "d"], ["x", "y", "z", "w"]], dtype=object)
    tags = tag_tokens(contexts, np.array([[1, 3], [0, 1], [1, 0]]), tagger=position_tagger)
    none = frozenset({NO_TOKEN})
    assert tags == [
        [{"x@3"}, {"x@2"}, {"x@1"}, {"x@0"}],
        [{"a@1"}, {"a@0"}, none, none],
        [{"x@0"}, none, none, none],
    ]
    assert tag_tokens(contexts, np.array([[0, 3]]), window=2, tagger=position_tagger) == [[{"a@3"}, {"a@2"}]]
    assert tag_tokens(contexts, np.array([[0, 2]]))[0][0] == builtin_tags(["a", "b", "c"], 2)


@pytest.mark.parametrize(
    "contexts, positions, window, message",
    [
        (np.array(["a", "b"]), [[0, 0]], 4, r"contexts_texts must have shape \[n, L\]"),
        ([["a", "b"]], [0, 1], 4, r"positions must have shape \[m, 2\]"),
        ([["a", "b"]], [[0.0, 1.0]], 4, "positions must be integers"),
        ([["a", "b"]], [[1, 0]], 4, r"every context index must lie in \[0, 0\]"),
        ([["a", "b"]], [[0, 2]], 4, r"every position must lie in \[0, 1\]"),
        ([["a", "b"]], [[0, 1]], 0, "window must be a positive int"),
    ],
)
def test_tag_tokens_errors(contexts, positions, window, message):
    with pytest.raises(ValueError, match=message):
        tag_tokens(np.array(contexts, dtype=object), np.array(positions), window=window)


def members(*offset_tags):
    """Cluster members from per-offset lists of tag sets: members([{"a"}, {"b"}], [{"c"}, {"d"}]) -> 2 members."""
    return [[frozenset(tags) for tags in member] for member in zip(*offset_tags, strict=True)]


def test_a_cluster_of_one_token_is_labelled_by_that_token():
    target = [{"tok:of"}] * 8 + [{"tok:in"}, {"tok:at"}]
    before = [{"tok:cat", "word"}] * 10
    label = label_cluster(members(target, before))
    assert label.positions == (("tok:of",), ("tok:cat",))
    assert label.coverage == (0.8, 1.0)
    assert label.simple
    assert label.text == "target ∈ {tok:of} · −1 ∈ {tok:cat}"


def test_the_most_specific_sufficient_tag_beats_a_broader_one():
    # Every member starts with a space, 80% are " of": {space} and {tok:of} both reach 70%; tok:of is more specific.
    target = [{"tok:of", "space", "word"}] * 8 + [{"tok:in", "space", "word"}] * 2
    assert label_cluster(members(target)).positions == (("tok:of",),)
    # At 90% only the broad tags reach the coverage in one pick; they tie, so the name decides.
    label = label_cluster(members(target), coverage=0.9)
    assert label.positions == (("space",),)
    assert label.coverage == (1.0,)


def test_a_diverse_offset_needs_three_tags_and_is_not_simple():
    target = [{"a"}] * 3 + [{"b"}] * 3 + [{"c"}] * 2 + [{"d"}] * 2
    label = label_cluster(members(target))
    # greedy: a (3, ties with b broken by name), b (3), then c reaches 7 of 10 (ties with d broken by name)
    assert label.positions == (("a", "b", "c"),)
    assert label.coverage == (0.8,)
    assert not label.simple
    assert label_cluster(members(target), max_simple_tags=3).simple


def test_padding_does_not_count_towards_simple():
    target = [{"tok:x"}] * 10
    before = [{NO_TOKEN}] * 4 + [{"a"}] * 2 + [{"b"}] * 2 + [{"c"}] * 2
    label = label_cluster(members(target, before))
    assert label.positions == (("tok:x",), (NO_TOKEN, "a", "b"))
    assert label.coverage == (1.0, 0.8)
    assert label.simple
    assert not label_cluster(members(target, before), max_simple_tags=1).simple


def test_coverage_threshold_is_inclusive_and_exact():
    target = [{"a"}] * 7 + [{"b"}] * 3
    assert label_cluster(members(target)).positions == (("a",),)  # 7/10 == 0.7 reaches the threshold
    assert label_cluster(members(target), coverage=0.71).positions == (("a", "b"),)
    three = [{"a"}] * 2 + [{"b"}]
    assert label_cluster(members(three)).coverage == (1.0,)  # 2/3 < 0.7


def test_label_to_dict_is_json_and_shows_newlines():
    label = label_cluster(members([{"tok:\n", "newline"}] * 3, [{"tok:\n"}] * 3))
    assert isinstance(label, ClusterLabel)
    data = json.loads(json.dumps(label.to_dict()))
    assert data == {
        "positions": [["tok:\n"], ["tok:\n"]],
        "coverage": [1.0, 1.0],
        "simple": True,
        "text": "target ∈ {tok:⏎} · −1 ∈ {tok:⏎}",
    }
    assert ClusterLabel(**{**data, "positions": tuple(map(tuple, data["positions"])),
                           "coverage": tuple(data["coverage"])}) == label


@pytest.mark.parametrize(
    "member_tags, kwargs, message",
    [
        ([], {}, "non-empty list"),
        ([[frozenset({"a"})], [frozenset({"a"}), frozenset({"b"})]], {}, "member 1: expected a list of 1 tag sets"),
        ([[frozenset({"a"})], [frozenset()]], {}, "member 1: every offset needs a non-empty set"),
        ([[frozenset({"a"})]], {"coverage": 0.0}, r"coverage must lie in \(0, 1\]"),
        ([[frozenset({"a"})]], {"coverage": 1.5}, r"coverage must lie in \(0, 1\]"),
        ([[frozenset({"a"})]], {"max_simple_tags": -1}, "max_simple_tags must be a non-negative int"),
    ],
)
def test_label_cluster_errors(member_tags, kwargs, message):
    with pytest.raises(ValueError, match=message):
        label_cluster(member_tags, **kwargs)


def test_labels_of_tagged_contexts_find_the_comma_before():
    contexts = np.array([[" a", ",", " b", " c"], ["x", ",", " y", "."], ["p", " q", ",", " r"]], dtype=object)
    samples = np.array([[0, 2], [1, 2], [2, 3]])
    label = label_cluster(tag_tokens(contexts, samples))
    assert label.positions[1] == ("tok:,",)
    assert label.coverage[1] == 1.0


def test_top_tokens_counts_and_orders_ties_by_text():
    texts = [" the", ",", " the", " of", ",", " the", " a"]
    assert top_tokens(texts) == [(" the", 3), (",", 2), (" a", 1), (" of", 1)]
    assert top_tokens(np.array(texts, dtype=object), k=2) == [(" the", 3), (",", 2)]
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_tokens(texts, k=0)


def test_format_context_marks_the_target():
    context = ["Hello", ",", " world", "\n", "Next", " line", "."]
    assert format_context(context, 2, before=2, after=2) == "Hello,⟦ world⟧⏎Next"
    assert format_context(context, 2) == "Hello,⟦ world⟧⏎Next"
    assert format_context(context, 3, before=1, after=0) == " world⟦⏎⟧"
    assert format_context(context, 6, before=0) == "⟦.⟧"
    with pytest.raises(ValueError, match="before must be a non-negative int"):
        format_context(context, 2, before=-1)


@pytest.fixture
def no_spacy(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "spacy" else find_spec(n, *a))
    spacy_pipeline.cache_clear()
    yield
    spacy_pipeline.cache_clear()


def test_without_spacy_the_builtin_tagger_is_used(no_spacy):
    assert spacy_pipeline() is None
    assert default_tagger() is builtin_tags


class FakeSpacy:
    """Stands in for a spaCy pipeline: words, punctuation and newline runs as tokens, single spaces dropped."""

    POS = {"The": "DET", "cat": "NOUN", "sat": "VERB", ".": "PUNCT", "Hi": "INTJ"}

    def __init__(self):
        self.texts = []

    def __call__(self, text):
        self.texts.append(text)
        return [
            SimpleNamespace(idx=m.start(), text=m.group(), pos_="SPACE" if m.group().isspace() else self.POS[m.group()])
            for m in re.finditer(r"\w+|[^\w\s]+|\n+", text)
        ]


def test_spacy_tags_align_parts_of_speech_by_characters():
    nlp = FakeSpacy()
    context = ["The", " c", "at", " sat", ".", END_OF_TEXT, "Hi"]
    tagger = functools.partial(spacy_tags, nlp)
    tags = [tagger(context, position) for position in range(len(context))]
    assert nlp.texts == ["The cat sat.\n\nHi"]  # parsed once, END_OF_TEXT read as a paragraph break
    assert [sorted(t for t in tag_set if t.startswith("pos:")) for tag_set in tags] == [
        ["pos:DET"], ["pos:NOUN"], ["pos:NOUN"], ["pos:VERB"], ["pos:PUNCT"], ["pos:SPACE"], ["pos:INTJ"]
    ]
    assert all(builtin_tags(context, p) <= tags[p] for p in range(len(context)))
