"""Byte-level BPE tokenizer and fixed-length training contexts for the English experiment.

The paper does not name its tokenizer (a vocabulary of 30,001 is inferred, §2.3 of the digest); here it is a GPT-2
style byte-level BPE (Hugging Face ``tokenizers``, ``pip install 'polca_jax[english]'``) trained on the run's own
documents, with one special token ``END_OF_TEXT`` that separates documents. Byte-level BPE covers every string, so
``decode(encode(text)) == text`` (except that a literal ``END_OF_TEXT`` in the text becomes the special token).
"""

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from polca_jax.errors import PolcaError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

END_OF_TEXT = "<|endoftext|>"
_ENCODE_CHUNK = 1024  # documents encoded per batch call (parallel in Rust) before checking for max_contexts


def train_tokenizer(documents: list[str], vocab_size: int) -> "Tokenizer":
    """A byte-level BPE tokenizer with at most ``vocab_size`` tokens (256 bytes + ``END_OF_TEXT`` + merges).

    Trained on ``documents`` only; a small corpus may give fewer than ``vocab_size`` tokens.
    """
    tokenizers = _tokenizers()
    _check_documents(documents)
    minimum = len(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise PolcaError(f"vocab_size must be an int >= {minimum} (256 bytes + END_OF_TEXT), got {vocab_size!r}")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer, length=len(documents))
    return tokenizer


def load_or_train_tokenizer(path: Path, documents: list[str], vocab_size: int) -> "Tokenizer":
    """The tokenizer saved at ``path`` (a ``tokenizer.json``) if it exists, else ``train_tokenizer`` saved there.

    A saved tokenizer is reused as is; it must hold ``END_OF_TEXT`` and at most ``vocab_size`` tokens.
    """
    tokenizers = _tokenizers()
    path = Path(path)
    if path.exists():
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises a bare Exception for unreadable files
            raise PolcaError(f"{path} is not a valid tokenizer file ({error}); delete it to train a new one") from error
        if tokenizer.token_to_id(END_OF_TEXT) is None:
            raise PolcaError(f"tokenizer {path} has no {END_OF_TEXT} token; delete it to train a new one")
        if tokenizer.get_vocab_size() > vocab_size:
            raise PolcaError(
                f"tokenizer {path} has {tokenizer.get_vocab_size()} tokens, more than vocab_size={vocab_size}; "
                "delete it to train a new one"
            )
        return tokenizer
    tokenizer = train_tokenizer(documents, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    tokenizer.save(str(partial))
    os.replace(partial, path)
    return tokenizer


def make_contexts(
    tokenizer: "Tokenizer", documents: list[str], context_length: int, *, max_contexts: int | None = None,
    separator: str = END_OF_TEXT,
) -> np.ndarray:
    """Non-overlapping token windows: int32[n, context_length + 1], at most ``max_contexts`` rows.

    The documents are encoded and joined into one stream with the token ``separator`` (``END_OF_TEXT``; a
    pretrained model's own end-of-text token) between consecutive documents, which is cut into windows of
    ``context_length + 1`` tokens; the incomplete tail is dropped. A model reads ``windows[:, :-1]`` and is scored on
    the next tokens ``windows[:, 1:]``.
    """
    _check_documents(documents)
    _check_positive_int("context_length", context_length)
    if max_contexts is not None:
        _check_positive_int("max_contexts", max_contexts)
    end_of_text = tokenizer.token_to_id(separator)
    if end_of_text is None:
        raise PolcaError(f"the tokenizer has no {separator} token" + (
            "; build it with train_tokenizer" if separator == END_OF_TEXT else ""))
    window = context_length + 1
    wanted = None if max_contexts is None else max_contexts * window
    pieces, total = [], 0
    for start in range(0, len(documents), _ENCODE_CHUNK):
        for encoding in tokenizer.encode_batch(documents[start : start + _ENCODE_CHUNK]):
            if pieces:
                pieces.append(np.array([end_of_text]))
                total += 1
            pieces.append(np.asarray(encoding.ids))
            total += len(encoding.ids)
        if wanted is not None and total >= wanted:
            break
    if total < window:
        raise PolcaError(
            f"the documents give {total} tokens, fewer than the {window} (context_length + 1) needed for one context"
        )
    stream = np.concatenate(pieces).astype(np.int32)
    num_contexts = total // window if max_contexts is None else min(total // window, max_contexts)
    return stream[: num_contexts * window].reshape(num_contexts, window)


def token_texts(tokenizer: "Tokenizer", ids: np.ndarray) -> np.ndarray:
    """Each token id decoded on its own: object array of ``str``, the shape of ``ids``.

    Byte-level markers become text (``Ġ`` a space, ``Ċ`` a newline), ``END_OF_TEXT`` stays as written, and a token
    holding part of a multi-byte character decodes to ``�``.
    """
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise PolcaError(f"ids must be integers, got dtype {ids.dtype}")
    vocab_size = tokenizer.get_vocab_size()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise PolcaError(f"ids must lie in [0, {vocab_size - 1}] for this tokenizer, got [{ids.min()}, {ids.max()}]")
    unique, inverse = np.unique(ids, return_inverse=True)
    texts = np.empty(len(unique), dtype=object)
    texts[:] = [tokenizer.decode([int(i)], skip_special_tokens=False) for i in unique]
    return texts[inverse.reshape(ids.shape)]


def _tokenizers():
    if importlib.util.find_spec("tokenizers") is None:
        raise PolcaError("the English experiment needs the tokenizers package: pip install 'polca_jax[english]'")
    return importlib.import_module("tokenizers")


def _check_documents(documents: list[str]) -> None:
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise PolcaError("documents must be a non-empty list of strings")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolcaError(f"{name} must be a positive int, got {value!r}")
