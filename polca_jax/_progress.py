"""Progress bars for long loops (tqdm), switchable off."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], enabled: bool, **kwargs) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar when ``enabled``."""
    return tqdm(items, **kwargs) if enabled else items
