"""Samples into batches: feed dicts concatenated on axis 0 where the model and the samples allow it.

Shared by the calibration runner (:mod:`onnxq.calibration.runner`) and the comparison
(:mod:`onnxq.evaluate`), so that both batch the same way: samples of different shapes (text of different
lengths) are never concatenated, a batch ends early instead.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import onnx

__all__ = ["concat_feeds", "same_shapes", "takes_batches", "group_samples"]

T = TypeVar("T")


def concat_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One feed holding ``feeds`` concatenated on axis 0 (the feed itself when there is one)."""
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def same_shapes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Whether two feeds can share a batch: the same inputs, of the same shapes after axis 0."""
    return a.keys() == b.keys() and all(np.shape(a[k])[1:] == np.shape(b[k])[1:] for k in a)


def takes_batches(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    """Whether samples can be concatenated on axis 0: every input's first dimension is one free
    (symbolic or unset) dimension, the same for all inputs, and every sample feeds it as 1."""
    firsts = set()
    for vi in model.graph.input:
        if vi.name not in feed:
            continue
        arr = feed[vi.name]
        if np.ndim(arr) == 0 or np.shape(arr)[0] != 1 or not vi.type.HasField("tensor_type"):
            return False
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape") or not dims or dims[0].dim_value > 0:
            return False
        firsts.add(dims[0].dim_param)
    return len(firsts) == 1


def group_samples(
    items: Iterable[T], size: int, *, feed_of: Callable[[T], dict[str, np.ndarray]] | None = None, first_alone: bool = False
) -> Iterator[list[T]]:
    """Consecutive ``items`` in groups of up to ``size``, a group ending early where the next sample's
    shapes differ (:func:`same_shapes`). ``feed_of`` gives an item's feed (default: the item is the feed);
    ``first_alone``: the first item forms a group of its own."""
    feed: Callable[[T], dict[str, np.ndarray]] = feed_of or _itself
    pending: list[T] = []
    first = first_alone
    for item in items:
        if pending and not same_shapes(feed(pending[0]), feed(item)):
            yield pending
            pending = []
        pending.append(item)
        if first or len(pending) >= size:
            yield pending
            pending = []
            first = False
    if pending:
        yield pending


def _itself(item: Any) -> dict[str, np.ndarray]:
    return item
