"""Small helpers for editing and walking onnx-graphsurgeon graphs, shared by the passes and
:mod:`onnxq.weightonly`: fresh names for inserted tensors and nodes, and the forward walk over what a
set of tensors feeds."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator

import onnx_graphsurgeon as gs

__all__ = ["FreshNames", "downstream_tensors"]


class FreshNames:
    """Names for the tensors and nodes a pass inserts, never colliding with the graph's existing ones.

    ``fresh("x_scale")`` returns ``x_scale``, or ``x_scale_2``, ``x_scale_3``... when the graph (or an earlier
    call) already uses it: a model may well have an initializer called ``x_scale`` already (ORT refuses
    repeated names).
    """

    def __init__(self, graph: gs.Graph) -> None:
        self.taken: set[str] = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, name: str) -> str:
        out, k = name, 1
        while out in self.taken:
            k += 1
            out = f"{name}_{k}"
        self.taken.add(out)
        return out


def downstream_tensors(start: Iterable[gs.Tensor], follow: Callable[[gs.Node], bool]) -> Iterator[gs.Tensor]:
    """The tensors ``start`` and those computed from them, breadth first, each once.

    A node reading a yielded tensor is followed (its outputs are yielded in turn) only where ``follow``
    says so; the caller sees each tensor before its readers are followed, so it may stop the walk early
    (a found answer) without paying for the rest of the graph.
    """
    seen: set[int] = set()
    todo = deque(start)
    while todo:
        t = todo.popleft()
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield t
        todo.extend(o for reader in t.outputs if follow(reader) for o in reader.outputs)
