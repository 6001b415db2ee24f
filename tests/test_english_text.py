import importlib.machinery
import importlib.util
import itertools
import json
import sys
import types

import numpy as np
import pytest

from experiments.english.text import load_documents, split_documents
from experiments.english.tokenizer import (
    END_OF_TEXT,
    load_or_train_tokenizer,
    make_contexts,
    token_texts,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def lee():
    return load_documents("lee")


@pytest.fixture(scope="module")
def tokenizer(lee):
    return train_tokenizer(lee[:100], vocab_size=600)


def hide_package(monkeypatch, name):
    """Make ``importlib.util.find_spec(name)`` report the package as not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else find_spec(n, *a))


def fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst doc\r\nline two.\r\n\r\n\n  Second doc.  \n \t\nThird\n\n\n")
    assert load_documents(str(path)) == ["First doc\nline two.", "Second doc.", "Third"]
    assert load_documents(str(path), max_documents=2) == ["First doc\nline two.", "Second doc."]


def test_jsonl_documents(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": " a "}, {"text": "   "}, {"text": "b\nc", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_documents(str(path)) == ["a", "b\nc"]


def test_directory_reads_txt_and_jsonl_files_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "a.txt").write_text("from txt 1\n\nfrom txt 2")
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("ignored too")
    assert load_documents(str(tmp_path)) == ["from txt 1", "from txt 2", "from jsonl"]
    assert load_documents(str(tmp_path), max_documents=1) == ["from txt 1"]


def test_lee_corpus_is_real_english(lee):
    assert len(lee) > 200
    words = " ".join(lee).split()
    assert len(words) > 50_000
    assert words.count("the") > 1000
    assert all(doc == doc.strip() and doc for doc in lee)
    assert load_documents("lee", max_documents=3) == lee[:3]


def bad_jsonl(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda d: str(d / "missing.txt"), r"missing\.txt does not exist"),
        (lambda d: str(d / "missing" / "corpus"), r"corpus does not exist"),
        (lambda d: (d / "x.csv").write_text("a") and str(d / "x.csv"), r"x\.csv has unknown extension '\.csv'"),
        (lambda d: (d / "x.txt").write_bytes(b"fine text\n\xff oops") and str(d / "x.txt"), r"x\.txt.*byte offset 10"),
        (lambda d: (d / "x.txt").write_text(" \n\n\t\n") and str(d / "x.txt"), r"x\.txt' is empty"),
        (lambda d: str(d), r"holds no \.txt or \.jsonl files"),
        (lambda d: "wikipedia", r"unknown corpus source 'wikipedia'"),
        (lambda d: bad_jsonl(d, ['{"text": "ok"}', "{not json"]), r"bad\.jsonl line 2: not valid JSON"),
        (lambda d: bad_jsonl(d, ['{"text": "ok"}', "", '{"body": "x"}']), r'bad\.jsonl line 3: .*"text" field'),
        (lambda d: bad_jsonl(d, ['["text"]']), r"line 1: .*JSON object"),
        (lambda d: "hf:", r"hf:NAME\[:CONFIG\[:SPLIT\]\]"),
    ],
)
def test_bad_sources_raise_clear_errors(tmp_path, make_source, message):
    with pytest.raises(ValueError, match=message):
        load_documents(make_source(tmp_path))


@pytest.mark.parametrize("max_documents", [0, -1, 1.5, True])
def test_max_documents_must_be_positive_int(max_documents):
    with pytest.raises(ValueError, match="max_documents"):
        load_documents("lee", max_documents=max_documents)


def test_lee_without_gensim_says_how_to_install(monkeypatch):
    hide_package(monkeypatch, "gensim")
    with pytest.raises(ValueError, match=r"gensim.*pip install 'polca_jax\[english\]'"):
        load_documents("lee")


def test_huggingface_without_datasets_says_how_to_install(monkeypatch):
    hide_package(monkeypatch, "datasets")
    with pytest.raises(ValueError, match=r"pip install 'polca_jax\[hf\]'"):
        load_documents("hf:wikipedia:20220301.en")


def test_huggingface_errors_name_the_dataset(monkeypatch):
    def load_dataset(name, config, split, streaming):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(ValueError, match=r"could not read Hugging Face dataset 'no/such'.*FileNotFoundError"):
        load_documents("hf:no/such")


def test_huggingface_streams_text_rows(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return ({"text": f" row {i} " if i != 1 else "  ", "title": "t"} for i in itertools.count())

    fake_datasets(monkeypatch, load_dataset)
    assert load_documents("hf:wiki:en:validation", max_documents=3) == ["row 0", "row 2", "row 3"]
    assert load_documents("hf:wiki", max_documents=1) == ["row 0"]
    assert calls == [("wiki", "en", "validation", True), ("wiki", None, "train", True)]


def test_huggingface_rows_need_a_text_field(monkeypatch):
    fake_datasets(monkeypatch, lambda name, config, split, streaming: iter([{"body": "x"}]))
    with pytest.raises(ValueError, match=r"'wiki'.*no string \"text\" field.*\['body'\]"):
        load_documents("hf:wiki")


def test_split_is_deterministic_and_partitions_documents():
    documents = [f"doc {i}" for i in range(20)]
    train, validation = split_documents(documents, 0.25, seed=3)
    assert (len(train), len(validation)) == (15, 5)
    assert sorted(train + validation) == sorted(documents)
    assert split_documents(documents, 0.25, seed=3) == (train, validation)
    assert split_documents(documents, 0.25, seed=4) != (train, validation)
    assert train + validation != documents[5:] + documents[:5]  # shuffled, not a plain cut


@pytest.mark.parametrize(
    "documents, fraction, message",
    [
        (["a", "b"], 0.0, "strictly between 0 and 1"),
        (["a", "b"], 1.0, "strictly between 0 and 1"),
        (["a"], 0.5, "both must be non-empty"),
        ([f"{i}" for i in range(10)], 0.01, "gives 0 validation and 10 training"),
        ("ab", 0.5, "list of strings"),
    ],
)
def test_split_errors(documents, fraction, message):
    with pytest.raises(ValueError, match=message):
        split_documents(documents, fraction, seed=0)


def test_tokenizer_is_byte_level_bpe_with_end_of_text(tokenizer):
    assert 300 < tokenizer.get_vocab_size() <= 600
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    assert end_of_text is not None
    assert tokenizer.encode(f"a{END_OF_TEXT}b").ids[1] == end_of_text
    text = "Héllo wörld — 日本語 🙂\n\n  indented\tand  spaced  out. "
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges are learned and used


def test_tokenizer_round_trips_through_a_file(tmp_path, lee):
    path = tmp_path / "run" / "tokenizer.json"
    trained = load_or_train_tokenizer(path, lee[:100], 600)
    assert path.is_file()
    reloaded = load_or_train_tokenizer(path, ["something else entirely"], 600)  # reused, not retrained
    assert reloaded.get_vocab() == trained.get_vocab()
    text = lee[150]
    assert reloaded.encode(text).ids == trained.encode(text).ids
    assert not list(path.parent.glob("*.partial"))


def test_saved_tokenizer_errors(tmp_path, tokenizer):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match=r"corrupt\.json is not a valid tokenizer file"):
        load_or_train_tokenizer(corrupt, ["x"], 600)
    big = tmp_path / "big.json"
    tokenizer.save(str(big))
    with pytest.raises(ValueError, match=rf"has {tokenizer.get_vocab_size()} tokens, more than vocab_size=400"):
        load_or_train_tokenizer(big, ["x"], 400)


@pytest.mark.parametrize("vocab_size", [100, 256, 600.0])
def test_vocab_size_must_cover_the_bytes(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_tokenizer(["some text"], vocab_size)


def test_tokenizer_without_the_package_says_how_to_install(monkeypatch):
    hide_package(monkeypatch, "tokenizers")
    with pytest.raises(ValueError, match=r"pip install 'polca_jax\[english\]'"):
        train_tokenizer(["text"], 300)


def test_contexts_are_windows_of_the_joined_token_stream(tokenizer, lee):
    documents = lee[100:110]
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    stream = []
    for i, document in enumerate(documents):
        stream += ([end_of_text] if i else []) + tokenizer.encode(document).ids
    contexts = make_contexts(tokenizer, documents, context_length=31)
    assert contexts.dtype == np.int32
    assert contexts.shape == (len(stream) // 32, 32)
    np.testing.assert_array_equal(contexts.ravel(), stream[: contexts.size])
    assert (contexts == end_of_text).sum() == 9 - (stream[contexts.size :].count(end_of_text))
    limited = make_contexts(tokenizer, documents, context_length=31, max_contexts=5)
    np.testing.assert_array_equal(limited, contexts[:5])


def test_contexts_need_enough_tokens(tokenizer):
    num_tokens = len(tokenizer.encode("a short text").ids) + 1 + len(tokenizer.encode("and another").ids)
    with pytest.raises(ValueError, match=rf"give {num_tokens} tokens, fewer than the 129 \(context_length \+ 1\)"):
        make_contexts(tokenizer, ["a short text", "and another"], context_length=128)
    with pytest.raises(ValueError, match="context_length must be a positive int"):
        make_contexts(tokenizer, ["text"], context_length=0)
    with pytest.raises(ValueError, match="max_contexts must be a positive int"):
        make_contexts(tokenizer, ["text"], context_length=1, max_contexts=0)


def test_token_texts_decode_each_id(tokenizer):
    ids = np.array(tokenizer.encode(f"The cat.\n\nA dog{END_OF_TEXT}Next").ids)
    texts = token_texts(tokenizer, ids.reshape(1, -1))
    assert texts.shape == (1, len(ids)) and texts.dtype == object
    assert all(isinstance(text, str) for text in texts.ravel())
    assert "".join(texts[0]) == f"The cat.\n\nA dog{END_OF_TEXT}Next"
    assert END_OF_TEXT in texts[0].tolist()
    assert any(text.startswith(" ") for text in texts[0]) and "\n" in "".join(texts[0])
    assert token_texts(tokenizer, np.zeros((0, 3), dtype=np.int64)).shape == (0, 3)
    with pytest.raises(ValueError, match="ids must lie in"):
        token_texts(tokenizer, np.array([tokenizer.get_vocab_size()]))
