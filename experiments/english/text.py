"""English documents for the language-modelling experiment: loading a corpus and splitting it.

``load_documents(source)`` accepts:

- ``"lee"``: the Lee news corpus (about 60k words, 300 documents, one per line) that ships inside the gensim wheel as
  ``gensim/test/test_data/lee_background.cor``. It is read in place, never copied; needs ``pip install
  'polca_jax[english]'``.
- ``"hf:NAME"``, ``"hf:NAME:CONFIG"`` or ``"hf:NAME:CONFIG:SPLIT"`` (split defaults to ``train``; an empty CONFIG means
  none): a Hugging Face dataset read with ``datasets.load_dataset(..., streaming=True)``, taking each row's ``"text"``
  field. Needs ``pip install 'polca_jax[hf]'`` and network access; pass ``max_documents`` for large datasets
  (the paper's English Wikipedia is probably ``hf:wikipedia:20220301.en``).
- a ``.txt`` file: documents are paragraphs separated by one or more blank lines (lines holding only whitespace);
  single newlines stay inside a document.
- a ``.jsonl`` file: one JSON object per line with a string ``"text"`` field (blank lines are skipped).
- a directory: every ``.txt`` and ``.jsonl`` file directly in it, in sorted name order.

Files must be UTF-8 (a leading byte-order mark is dropped). Documents are stripped of surrounding whitespace and
empty ones are dropped.
"""

import importlib.util
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from polca_jax.errors import PolcaError

FILE_SUFFIXES = (".txt", ".jsonl")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def load_documents(source: str, *, max_documents: int | None = None) -> list[str]:
    """The first ``max_documents`` (default all) non-empty, stripped documents of ``source`` (see module docstring)."""
    if max_documents is not None and (
        isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents <= 0
    ):
        raise PolcaError(f"max_documents must be a positive int or None, got {max_documents!r}")
    if not isinstance(source, str) or not source:
        raise PolcaError(f"source must be a non-empty string, got {source!r}")
    documents = list(itertools.islice(_iter_documents(source), max_documents))
    if not documents:
        raise PolcaError(f"corpus {source!r} is empty: it has no non-whitespace text")
    return documents


def split_documents(documents: list[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle of ``documents``, then ``(train, validation)`` with ``round(fraction * n)`` validation documents.

    Both parts must be non-empty, so at least 2 documents are needed.
    """
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise PolcaError("documents must be a list of strings")
    if not 0.0 < validation_fraction < 1.0:
        raise PolcaError(f"validation_fraction must lie strictly between 0 and 1, got {validation_fraction!r}")
    n = len(documents)
    num_validation = round(validation_fraction * n)
    if not 0 < num_validation < n:
        raise PolcaError(
            f"validation_fraction {validation_fraction} of {n} documents gives {num_validation} validation and "
            f"{n - num_validation} training documents; both must be non-empty"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [documents[i] for i in order]
    return shuffled[num_validation:], shuffled[:num_validation]


def _iter_documents(source: str) -> Iterator[str]:
    if source == "lee":
        return _lines(_lee_path())
    if source.startswith("hf:"):
        return _huggingface(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise PolcaError(f"directory {path} holds no {' or '.join(FILE_SUFFIXES)} files")
        return itertools.chain.from_iterable(_file_documents(p) for p in files)
    if path.is_file():
        return _file_documents(path)
    if path.suffix or "/" in source or "\\" in source:
        raise PolcaError(f"corpus file {path} does not exist")
    raise PolcaError(
        f"unknown corpus source {source!r}: expected 'lee', 'hf:NAME[:CONFIG[:SPLIT]]', or an existing "
        f"{' / '.join(FILE_SUFFIXES)} file or directory"
    )


def _lee_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise PolcaError("the 'lee' corpus ships with gensim, which is not installed: pip install 'polca_jax[english]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise PolcaError(f"the installed gensim has no Lee corpus at {path}; reinstall gensim>=4.3")
    return path


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix not in FILE_SUFFIXES:
        raise PolcaError(f"corpus file {path} has unknown extension {path.suffix!r}; expected one of {FILE_SUFFIXES}")
    text = _read_utf8(path)
    if path.suffix == ".txt":
        return _nonempty(_BLANK_LINES.split(text))
    return _jsonl(path, text)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolcaError(
            f"corpus file {path} is not valid UTF-8: byte offset {error.start} ({error.reason})"
        ) from error
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _lines(path: Path) -> Iterator[str]:
    return _nonempty(_read_utf8(path).split("\n"))


def _jsonl(path: Path, text: str) -> Iterator[str]:
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PolcaError(f"{path} line {line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise PolcaError(f'{path} line {line_number}: expected a JSON object with a string "text" field')
        yield from _nonempty([row["text"]])


def _huggingface(source: str) -> Iterator[str]:
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise PolcaError(f"Hugging Face source must look like 'hf:NAME[:CONFIG[:SPLIT]]', got {source!r}")
    parts += [""] * (3 - len(parts))
    name, config, split = parts[0], parts[1] or None, parts[2] or "train"
    if importlib.util.find_spec("datasets") is None:
        raise PolcaError(f"source {source!r} needs the Hugging Face datasets package: pip install 'polca_jax[hf]'")
    datasets = importlib.import_module("datasets")
    described = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as error:  # the library raises many types: not found, no network, bad config or split
        raise _huggingface_error(described, error) from error
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as error:
            raise _huggingface_error(described, error) from error
        if not isinstance(row.get("text"), str):
            raise PolcaError(f'{described} has no string "text" field; its fields are {sorted(row)}')
        yield from _nonempty([row["text"]])


def _huggingface_error(described: str, error: Exception) -> ValueError:
    return ValueError(f"could not read {described}: {type(error).__name__}: {error}")


def _nonempty(texts) -> Iterator[str]:
    for text in texts:
        text = text.strip()
        if text:
            yield text


def target_positions(num_contexts: int, context_length: int) -> np.ndarray:
    """int[N, 2]: (context, column of the target token in the ``[n, L + 1]`` token arrays) of each sample, for
    contexts from which the model reads ``context_length = L`` tokens."""
    samples = np.arange(num_contexts * context_length)
    return np.stack([samples // context_length, samples % context_length + 1], axis=1)
