import functools
import importlib.util
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from experiments.english import KINDS, token_kind
from experiments.english.labels import (
    CLOSED_CLASSES,
    FUNCTION_CLASSES,
    MIN_ENRICHMENT,
    NO_TOKEN,
    NUMBER_WORDS,
    BaseRates,
    ClusterLabel,
    base_rates,
    builtin_tags,
    default_tagger,
    format_context,
    label_cluster,
    spacy_pipeline,
    spacy_tags,
    tag_tokens,
    top_tokens,
)
from experiments.english.tokenizer import END_OF_TEXT

CONTEXT = ["The", " cat", " sat", ".", "\n", "\n", "In", " 1990", ",", " the", " cat", "s", END_OF_TEXT, " (", "x"]


@pytest.mark.parametrize(
    "position, expected",
    [
        (0, {"tok:the", "class:determiner", "capitalized:sentence-start"}),  # the context start counts as one
        (1, {"tok:cat", "class:content-word"}),
        (3, {"tok:.", "punct:sentence-end"}),
        (4, {"tok:\n", "newline"}),
        (5, {"tok:\n", "newline", "repeated"}),
        (6, {"tok:in", "class:preposition", "capitalized:sentence-start"}),
        (7, {"tok:1990", "number:digits"}),
        (8, {"tok:,", "punct:comma"}),
        (9, {"tok:the", "class:determiner"}),  # "The" at 0 is another token text: not repeated
        (10, {"tok:cat", "class:content-word", "repeated"}),  # " cat" "s": the word is "cats"
        (11, {"tok:s", "continuation"}),
        (12, {f"tok:{END_OF_TEXT}", "end-of-text"}),
        (13, {"tok:(", "punct:bracket"}),
        (14, {"tok:x", "class:content-word"}),  # after punctuation: starts a word
    ],
)
def test_builtin_tags_of_a_hand_made_context(position, expected):
    assert builtin_tags(CONTEXT, position) == expected


def word_classes(context, position):
    """The tags of a token other than its ``tok:`` tag."""
    return {tag for tag in builtin_tags(context, position) if not tag.startswith("tok:")}


@pytest.mark.parametrize(
    "context, position, expected",
    [
        # closed classes, read from the whole word
        ([" on", " the", " mat"], 1, {"class:determiner"}),
        ([" said", " he", " was"], 1, {"class:pronoun"}),
        ([" said", " he", " was"], 2, {"class:auxiliary"}),
        ([" one", " of", " them"], 1, {"class:preposition"}),
        ([" one", " of", " them"], 2, {"class:pronoun"}),
        ([" cats", " and", " dogs"], 1, {"class:conjunction"}),
        ([" said", " that", " it"], 1, {"class:subordinator"}),
        ([" it", " would", " rain"], 1, {"class:modal"}),
        ([" it", " did", " not", " rain"], 2, {"class:negation"}),
        ([" the", " man", " who", " left"], 2, {"class:wh-word"}),
        ([" is", " very", " old"], 1, {"class:adverb"}),
        ([" in", "j", "ury"], 0, {"class:content-word"}),  # " in" starts "injury", not the preposition
        ([" in", "j", "ury"], 1, {"continuation"}),
        ([" in", "j", "ury"], 2, {"continuation"}),
        ([" play", "ing", " cricket"], 0, {"class:content-word"}),
        ([" play", "ing", " cricket"], 1, {"continuation"}),
        ([" the", " wor"], 1, {"class:content-word"}),  # a word cut off by the end of the context: read as it goes
        # clitics and negated stems
        ([" week", "'s", " match"], 1, {"class:clitic"}),
        ([" they", "'re", " here"], 1, {"class:auxiliary"}),
        ([" we", "'ll", " see"], 1, {"class:modal"}),
        ([" don", "'t", " go"], 0, {"class:auxiliary"}),
        ([" won", "'t", " go"], 0, {"class:modal"}),
        ([" don", "'t", " go"], 1, {"class:negation"}),
        ([" they", " won", " the"], 1, {"class:content-word"}),  # no 't after it: the verb
        ([" week", "'", "s", " match"], 1, {"punct:apostrophe"}),  # a clitic split in two pieces
        ([" week", "'", "s", " match"], 2, {"class:clitic"}),
        (["O", "'", "Brien"], 1, {"punct:apostrophe"}),
        # capitalised words: names in mid-sentence, sentence starts after a sentence end, newline or quote
        ([" in", " Sydney", " on"], 1, {"class:name", "capitalized:mid-sentence"}),
        ([" in", " Austral", "ia"], 1, {"class:name", "capitalized:mid-sentence"}),
        ([" in", " Austral", "ia"], 2, {"continuation"}),
        ([" left", ".", " He", " said"], 2, {"class:pronoun", "capitalized:sentence-start"}),
        ([" left", ".", " Rain", " fell"], 2, {"class:content-word", "capitalized:sentence-start"}),
        ([" left", ".", " \"", "He", " said"], 3, {"class:pronoun", "capitalized:sentence-start"}),
        ([" left", ".\"", " He", " said"], 2, {"class:pronoun", "capitalized:sentence-start"}),
        ([" left", "),", " He", " said"], 2, {"class:pronoun", "capitalized:mid-sentence"}),
        ([" left", "\n", "The", " end"], 2, {"class:determiner", "capitalized:sentence-start"}),
        ([END_OF_TEXT, "The", " end"], 1, {"class:determiner", "capitalized:sentence-start"}),
        ([" and", " I", " left"], 1, {"class:pronoun", "capitalized:mid-sentence"}),
        ([" the", " NATO", " talks"], 1, {"class:name", "capitalized:mid-sentence"}),
        # numbers
        ([" in", " 1999", ","], 1, {"number:digits"}),
        ([" the", " 1990", "s"], 1, {"number:digits"}),
        ([" the", " 1990", "s"], 2, {"continuation"}),
        ([" the", " 19", "99"], 2, {"continuation"}),
        ([" won", " three", " games"], 1, {"number:word"}),
        ([" 3", ".", "5", " m"], 1, {"number:separator"}),
        ([" 1", ",", "000", " m"], 1, {"number:separator"}),
        ([" 1", ",", "000", " m"], 2, {"number:digits"}),
        ([" 1", ",", " 2"], 1, {"punct:comma"}),  # a space after it: a list, not a number
        # punctuation
        ([" left", "."], 1, {"punct:sentence-end"}),
        ([" left", "!"], 1, {"punct:sentence-end"}),
        ([" left", "?"], 1, {"punct:sentence-end"}),
        ([" left", ","], 1, {"punct:comma"}),
        ([" left", ";"], 1, {"punct:colon"}),
        ([" left", ":"], 1, {"punct:colon"}),
        ([" said", " \""], 1, {"punct:quote"}),
        ([" said", " “"], 1, {"punct:quote"}),
        ([" left", " ("], 1, {"punct:bracket"}),
        ([" left", " —"], 1, {"punct:dash"}),
        ([" well", "-", "known"], 1, {"punct:dash"}),
        ([" 5", "%"], 1, {"punct:other"}),
        ([" cost", " $"], 1, {"punct:other"}),
        ([" left", ".\""], 1, {"punct:sentence-end", "punct:quote"}),  # each kind of a token of several marks
        ([" left", "),"], 1, {"punct:bracket", "punct:comma"}),
        # layout and the rest
        ([" left", "\n\n"], 1, {"newline"}),
        ([" left", " \n"], 1, {"newline"}),
        ([" left", "  "], 1, {"whitespace"}),
        ([" left", END_OF_TEXT], 1, {"end-of-text"}),
        ([" caf", "\ufffd"], 1, {"other"}),
    ],
)
def test_builtin_word_classes(context, position, expected):
    assert word_classes(context, position) == expected


def test_closed_word_lists_are_small_lowercase_and_disjoint():
    lists = [*CLOSED_CLASSES.values(), NUMBER_WORDS]
    words = [word for words in lists for word in words]
    assert len(words) == len(set(words)), "a word is in two lists"
    assert all(word == word.lower() and word.isalpha() for word in words)
    assert all(0 < len(words) < 100 for words in lists)
    assert set(FUNCTION_CLASSES) == {f"class:{name}" for name in CLOSED_CLASSES} | {"class:clitic"}


def test_every_token_has_one_class_or_punctuation_kinds():
    context = [" The", " cat", "'s", " 3", ".", "5", " kg", ".\"", "\n", "He", " said", END_OF_TEXT]
    for position in range(len(context)):
        tags = word_classes(context, position) - {"repeated", "capitalized:sentence-start",
                                                  "capitalized:mid-sentence"}
        assert len(tags) == 1 or all(tag.startswith("punct:") for tag in tags), (position, tags)


@pytest.mark.parametrize(
    "context, position, kind",
    [
        ([" left", END_OF_TEXT], 1, "end of text"),
        ([" left", "\n"], 1, "newline"),
        ([" left", "  "], 1, "whitespace"),
        ([" left", ".\""], 1, "punctuation"),
        ([" in", " 1999"], 1, "number"),
        ([" won", " three"], 1, "number"),
        ([" play", "ing"], 1, "word continuation"),
        ([" cats", " and"], 1, "function word"),
        ([" week", "'s"], 1, "function word"),
        ([" in", " Sydney"], 1, "name"),
        ([" the", " cat"], 1, "content word"),
        ([" left", ".", " Rain"], 2, "content word"),
        ([" caf", "\ufffd"], 1, "other"),
    ],
)
def test_token_kind_is_one_coarse_class(context, position, kind):
    assert token_kind(context, position) == kind
    assert kind in KINDS


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
        "base_coverage": None,
        "informative": None,
        "few_tags": True,
        "simple": True,
        "text": "target ∈ {tok:⏎} · −1 ∈ {tok:⏎}",
    }
    assert ClusterLabel(**{**data, "positions": tuple(map(tuple, data["positions"])),
                           "coverage": tuple(data["coverage"])}) == label


def test_label_with_base_rates_to_dict():
    population = members([{"tok:\n", "newline"}] * 3 + [{"tok:a", "class:determiner"}] * 7,
                         [{"tok:\n"}] * 2 + [{NO_TOKEN}] + [{"tok:x"}] * 7)
    label = label_cluster(population[:3], base_rates=base_rates(population))
    data = json.loads(json.dumps(label.to_dict()))
    assert data == {
        "positions": [["tok:\n"], ["tok:\n", NO_TOKEN]],
        "coverage": [1.0, 1.0],
        "base_coverage": [0.3, 0.3],
        "informative": [True, False],  # padding at −1: never informative
        "few_tags": True,
        "simple": True,
        "text": "target ∈ {tok:⏎} (100% vs 30%) · −1 ∈ {tok:⏎, none} (100% vs 30%)",
    }


def test_base_rates_measure_unions_of_tags_among_all_samples():
    population = members([{"tok:of", "class:preposition"}] * 2 + [{"tok:in", "class:preposition"}]
                         + [{"tok:cat", "class:content-word"}] * 5,
                         [{NO_TOKEN}] * 4 + [{"tok:the"}] * 4)
    rates = base_rates(population)
    assert isinstance(rates, BaseRates) and rates.num_samples == 8 and rates.num_offsets == 2
    assert rates.coverage(0, ["tok:of"]) == 0.25
    assert rates.coverage(0, ["tok:of", "class:preposition"]) == 0.375  # a union, not a sum
    assert rates.coverage(0, ["tok:of", "tok:cat"]) == 0.875
    assert rates.coverage(0, ["unseen"]) == 0.0 and rates.coverage(0, []) == 0.0
    assert rates.coverage(1, [NO_TOKEN]) == 0.5
    assert rates.rates(0) == {"class:content-word": 0.625, "tok:cat": 0.625, "class:preposition": 0.375,
                              "tok:of": 0.25, "tok:in": 0.125}
    with pytest.raises(ValueError, match="offset 2 is outside the 2 offsets"):
        rates.coverage(2, ["tok:of"])
    with pytest.raises(ValueError, match="offset -1 is outside the 2 offsets"):
        rates.rates(-1)


NEWS = ("Heavy rain flooded coastal towns on Monday , forcing thousands of residents to leave flooded homes . "
        "Emergency crews rescued stranded drivers near swollen rivers , while local officials warned worried farmers "
        "about rising water levels in low fields .")
PREPOSITIONS = (" on", " of", " to", " near", " about", " in")


def news_population():
    """Token texts of a news sentence as BPE-like pieces, and the tags of its samples (4 offsets), as in a run."""
    context = [word if word in ".," else " " + word for word in NEWS.split(" ")]
    positions = np.array([[0, p] for p in range(1, len(context))])
    return [context[p] for _, p in positions], tag_tokens(np.array([context], dtype=object), positions)


def test_a_cluster_of_ordinary_words_is_not_simple_but_prepositions_are():
    targets, tags = news_population()
    rates = base_rates(tags)
    words = [i for i, tag_sets in enumerate(tags) if "class:content-word" in tag_sets[0]]
    assert len(words) / len(targets) > 0.5  # as in running text, most tokens are content words
    label = label_cluster([tags[i] for i in words], base_rates=rates)
    assert label.positions[0] == ("class:content-word",) and label.coverage[0] == 1.0
    assert label.base_coverage[0] == pytest.approx(len(words) / len(targets))
    assert label.few_tags and label.informative == (False,) * 4 and not label.simple
    assert label_cluster([tags[i] for i in words]).simple  # the paper's tag count alone would count it
    assert not label_cluster(tags[::2], base_rates=rates).simple  # a sample of the text is no finding either
    prepositions = [i for i, target in enumerate(targets) if target in PREPOSITIONS]
    label = label_cluster([tags[i] for i in prepositions], base_rates=rates)
    share = len(prepositions) / len(targets)
    assert label.positions[0] == ("class:preposition",) and label.informative[0] and label.simple
    assert label.coverage[0] == 1.0 and label.base_coverage[0] == pytest.approx(share)
    assert label.text.startswith(f"target ∈ {{class:preposition}} (100% vs {share:.0%}) · −1 ∈ ")


def test_enrichment_threshold_is_inclusive_and_padding_is_never_informative():
    # the population: 10 samples; "a" on 4 of them at the target, padding on 4 at −1
    population = members([{"a"}] * 4 + [{"b"}] * 6, [{NO_TOKEN}] * 4 + [{"c"}] * 6)
    rates = base_rates(population)
    cluster = population[:4]  # all "a" (100% vs 40%: 2.5x) and all padding at −1
    label = label_cluster(cluster, base_rates=rates)
    assert label.positions == (("a",), (NO_TOKEN,))
    assert label.base_coverage == (0.4, 0.4) and label.informative == (True, False) and label.simple
    assert label_cluster(cluster, base_rates=rates, min_enrichment=2.5).informative == (True, False)
    label = label_cluster(cluster, base_rates=rates, min_enrichment=2.6)
    assert label.informative == (False, False) and label.few_tags and not label.simple
    assert MIN_ENRICHMENT == 2.0


def test_too_many_tags_is_not_simple_even_when_informative():
    population = members([{"a"}] * 3 + [{"b"}] * 3 + [{"c"}] * 2 + [{"d"}] * 2 + [{"e"}] * 90)
    label = label_cluster(population[:10], base_rates=base_rates(population))
    assert label.positions == (("a", "b", "c"),) and label.informative == (True,)
    assert not label.few_tags and not label.simple


@pytest.mark.parametrize(
    "member_tags, kwargs, message",
    [
        ([], {}, "non-empty list"),
        ([[frozenset({"a"})], [frozenset({"a"}), frozenset({"b"})]], {}, "member 1: expected a list of 1 tag sets"),
        ([[frozenset({"a"})], [frozenset()]], {}, "member 1: every offset needs a non-empty set"),
        ([[frozenset({"a"})]], {"coverage": 0.0}, r"coverage must lie in \(0, 1\]"),
        ([[frozenset({"a"})]], {"coverage": 1.5}, r"coverage must lie in \(0, 1\]"),
        ([[frozenset({"a"})]], {"max_simple_tags": -1}, "max_simple_tags must be a non-negative int"),
        ([[frozenset({"a"})]], {"base_rates": {"a": 0.5}}, r"base_rates must come from base_rates\(all_tags\)"),
        ([[frozenset({"a"})]], {"base_rates": base_rates([[frozenset({"a"})] * 2])}, "base_rates has 2 offsets"),
        ([[frozenset({"a"})]], {"min_enrichment": 0.5}, "min_enrichment must be a number >= 1"),
        ([[frozenset({"a"})]], {"min_enrichment": float("nan")}, "min_enrichment must be a number >= 1"),
    ],
)
def test_label_cluster_errors(member_tags, kwargs, message):
    with pytest.raises(ValueError, match=message):
        label_cluster(member_tags, **kwargs)


@pytest.mark.parametrize(
    "all_tags, message",
    [
        ([], "all_tags must be a non-empty list"),
        ([[frozenset({"a"})], [frozenset({"a"}), frozenset({"b"})]], "sample 1: expected a list of 1 tag sets"),
        ([[frozenset({"a"})], ["a"]], "sample 1: every offset needs a non-empty set"),
    ],
)
def test_base_rates_errors(all_tags, message):
    with pytest.raises(ValueError, match=message):
        base_rates(all_tags)


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
