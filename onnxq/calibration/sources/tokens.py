"""Token-id ``.json`` lists and running text cut into windows (causal LMs): :class:`TokenFileSource`,
:class:`TextWindowSource`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, count_text, evenly_spaced
from onnxq.calibration.sources.text import TextSource
from onnxq.calibration.sources.token_inputs import roles_text, token_feed, token_roles
from onnxq.errors import CalibrationError

_TOKEN_KEYS = ("input_ids", "tokens", "token_ids", "ids")


class TokenFileSource(CalibrationSource):
    """A JSON list of token ids (already tokenized text) cut into non-overlapping windows of ``seq_len`` tokens.

    The file holds a flat list of ints (the shared ``text/tokens/*.json``), a list of such lists (joined in
    order) or an object with one of the keys ``input_ids``, ``tokens``, ``token_ids``, ``ids`` (or a single
    list-valued key) holding one. Each window is one sample, fed as ``input_ids`` [1, seq_len]; the tokens
    after the last whole window are not used. ``attention_mask`` (ones), ``token_type_ids`` (zeros) and
    ``position_ids`` are filled when the model has them. The list is loaded whole (token lists are small);
    windows are cut lazily; ``limit`` picks windows evenly spaced. Needs no tokenizer.
    """

    def __init__(self, path: str | Path, specs: list[InputSpec], *, seq_len: int = 512, limit: int | None = None) -> None:
        self.path, self.specs = Path(path), list(specs)
        if seq_len < 1:
            raise CalibrationError(f"seq_len must be a positive number of tokens, got {seq_len}")
        self.seq_len = seq_len
        self.roles = token_roles(self.specs, "token file")
        self.tokens = self._load()
        self.windows = len(self.tokens) // seq_len
        if self.windows == 0:
            raise CalibrationError(f"token file {self.path} holds {len(self.tokens)} tokens, fewer than one window of "
                                   f"seq_len {seq_len}; use a smaller --seq-len")
        self.indices = evenly_spaced(self.windows, limit)

    def _load(self) -> np.ndarray:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationError(f"token file {self.path} is not JSON ({e}); it should hold a list of token ids") from e
        except OSError as e:
            raise CalibrationError(f"cannot read token file {self.path}: {e}") from e
        if isinstance(data, dict):
            key = next((k for k in _TOKEN_KEYS if isinstance(data.get(k), list)), None)
            lists = [k for k, v in data.items() if isinstance(v, list)]
            key = key if key is not None else lists[0] if len(lists) == 1 else None
            if key is None:
                raise CalibrationError(f"token file {self.path} is a JSON object with keys {sorted(data)[:8]}; it needs "
                                       f"a list of token ids under one of {', '.join(_TOKEN_KEYS)}")
            data = data[key]
        if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
            data = [t for x in data for t in x]
        bad = not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data)
        if bad:
            raise CalibrationError(f"token file {self.path} does not hold a list of integer token ids")
        tokens = np.asarray(data, dtype=np.int64)
        if tokens.size and tokens.min() < 0:
            raise CalibrationError(f"token file {self.path} holds a negative token id ({int(tokens.min())})")
        return tokens

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        L = self.seq_len
        for i in self.indices:
            yield token_feed(self.specs, self.roles, self.tokens[i * L:(i + 1) * L])

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return f"token window for '{name}' (seq_len {self.seq_len}) from {self.path.name}"

    def describe(self) -> str:
        left = len(self.tokens) - self.windows * self.seq_len
        rest = f", {left} left over" if left else ""
        return (f"token file {self.path} ({count_text(len(self), self.windows, f'windows of {self.seq_len} tokens')}; "
                f"{len(self.tokens)} tokens{rest}; inputs {roles_text(self.roles)})")


class TextWindowSource(TokenFileSource):
    """Running text tokenized as a whole and cut into windows of ``seq_len`` tokens: calibration for causal
    language models (GPTQ, AWQ), which want long contiguous windows rather than one short sample per line.

    Used when a text file comes with ``--tokenizer`` *and* ``--seq-len``. A ``.txt`` file is read as is
    (newlines kept, blank lines included) in chunks of whole lines; ``.jsonl`` / ``.tsv`` / ``.csv`` texts
    (chosen as :class:`TextSource` chooses them) are joined with blank lines. No special tokens are added.
    The ids are then windowed exactly like a token file (``limit`` picks windows evenly spaced).
    """

    CHUNK = 1 << 16  # characters tokenized at a time (whole lines)

    def __init__(self, path: str | Path, specs: list[InputSpec], *, tokenizer: str | Path, seq_len: int = 512,
                 limit: int | None = None) -> None:
        self.text = TextSource(path, specs, tokenizer=tokenizer, max_length=1 << 30)
        self.text.tokenizer.no_truncation()
        self.text.tokenizer.no_padding()
        super().__init__(path, specs, seq_len=seq_len, limit=limit)

    def _load(self) -> np.ndarray:
        tok = self.text.tokenizer
        ids: list[int] = []

        def flush(parts: list[str]) -> None:
            if parts:
                ids.extend(tok.encode("".join(parts), add_special_tokens=False).ids)
                parts.clear()

        parts: list[str] = []
        size = 0
        try:
            if self.text.kind == "lines":
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        parts.append(line)
                        size += len(line)
                        if size >= self.CHUNK:
                            flush(parts)
                            size = 0
            else:
                for _, text in self.text._texts():
                    parts.append(text + "\n\n")
                    size += len(text)
                    if size >= self.CHUNK:
                        flush(parts)
                        size = 0
            flush(parts)
        except UnicodeDecodeError as e:
            raise CalibrationError(f"text calibration file {self.path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        return np.asarray(ids, dtype=np.int64)

    def _label(self, name: str) -> str:
        return f"text window for '{name}' (seq_len {self.seq_len}) from {self.path.name}"

    def describe(self) -> str:
        return (f"text file {self.path} tokenized with {self.text.tokenizer_path} into "
                f"{count_text(len(self), self.windows, f'windows of {self.seq_len} tokens')} ({len(self.tokens)} tokens; "
                f"inputs {roles_text(self.roles)})")
