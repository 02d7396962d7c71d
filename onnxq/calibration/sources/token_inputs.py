"""Feeding token ids to a model: which input gets what (:data:`TOKEN_INPUTS`), shared by the text and
token-file sources."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnxq.calibration.sources.base import InputSpec
from onnxq.errors import CalibrationError, MissingDependencyError

#: The model inputs a text or token source fills, and with what.
TOKEN_INPUTS = {"input_ids": "token ids", "attention_mask": "ones", "token_type_ids": "zeros",
                "position_ids": "0, 1, 2, ..."}


def token_roles(specs: list[InputSpec], what: str) -> dict[str, str]:
    """Input name -> which :data:`TOKEN_INPUTS` entry feeds it; raises for inputs a token source cannot fill.

    A model with a single integer input under another name (``tokens``, ``ids``) gets the token ids there.
    """
    for s in specs:
        if s.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
            raise CalibrationError(f"model input '{s.name}' has dtype {s.dtype}; a {what} feeds int64/int32 token "
                                   f"inputs only ({', '.join(TOKEN_INPUTS)})")
    if len(specs) == 1 and specs[0].name not in TOKEN_INPUTS:
        return {specs[0].name: "input_ids"}
    unknown = [s.name for s in specs if s.name not in TOKEN_INPUTS]
    if unknown:
        names = ", ".join(f"'{n}'" for n in unknown)
        raise CalibrationError(f"model input{'s' if len(unknown) > 1 else ''} {names} cannot be filled by a {what}: "
                               f"it fills {', '.join(f'{k} ({v})' for k, v in TOKEN_INPUTS.items())}; give .npz "
                               "files keyed by input name instead")
    if "input_ids" not in (s.name for s in specs):
        raise CalibrationError(f"the model has no 'input_ids' input (its inputs are {[s.name for s in specs]}); "
                               f"a {what} needs one to feed the token ids")
    return {s.name: s.name for s in specs}


def static_seq_len(specs: list[InputSpec]) -> int | None:
    """The static sequence length (dim 1 of a rank-2 token input), if any input has one."""
    for s in specs:
        if len(s.shape) == 2 and isinstance(s.shape[1], int) and s.shape[1] > 0:
            return s.shape[1]
    return None


def token_feed(specs: list[InputSpec], roles: dict[str, str], ids: Any, mask: Any = None,
                type_ids: Any = None) -> dict[str, np.ndarray]:
    """One feed (batch 1) from a token-id sequence; mask/type ids default to ones/zeros."""
    n = len(ids)
    feed = {}
    for s in specs:
        role = roles[s.name]
        if role == "input_ids":
            x = np.asarray(ids)
        elif role == "attention_mask":
            x = np.ones(n, np.int64) if mask is None else np.asarray(mask)
        elif role == "token_type_ids":
            x = np.zeros(n, np.int64) if type_ids is None else np.asarray(type_ids)
        else:
            x = np.arange(n)
        feed[s.name] = np.ascontiguousarray(x.astype(s.dtype, copy=False)[None])
    return feed


def import_tokenizers() -> Any:
    """The ``tokenizers`` package, or a MissingDependencyError naming the extra to install."""
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDependencyError('text calibration needs the tokenizers package: pip install "onnxq[text]"') from e
    return tokenizers


def is_number(cell: str) -> bool:
    """True when a CSV/TSV cell parses as a number (how the text column and a header row are told apart)."""
    try:
        float(cell)
    except ValueError:
        return False
    return True
