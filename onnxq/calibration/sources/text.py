"""Text files tokenized with a ``tokenizers`` file, one sample per line or row: :class:`TextSource`."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Generator, Iterator

import numpy as np
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, count_text, evenly_spaced
from onnxq.calibration.sources.token_inputs import roles_text, import_tokenizers, is_number, static_seq_len, token_feed, token_roles
from onnxq.errors import CalibrationError

#: Text file suffixes :class:`TextSource` reads: plain text (one sample a line), JSONL, TSV/CSV.
TEXT_SUFFIXES = frozenset({".txt", ".jsonl", ".tsv", ".csv"})
#: Padding modes of :class:`TextSource`.
PADDING = ("none", "longest", "max_length")


class TextSource(CalibrationSource):
    """Text samples tokenized with a Hugging Face ``tokenizers`` file (``tokenizer.json``), one sample per feed.

    Formats, by suffix:

    - ``.txt``: one sample per non-blank line (long running text such as wikitext or TinyStories is simply
      taken line by line; blank lines are skipped).
    - ``.jsonl``: one JSON value per non-blank line: an object whose field ``"text"`` is used, or, when the
      first object has no string ``"text"``, its first string field (:meth:`describe` says which); a line
      holding a bare JSON string is used as is.
    - ``.tsv`` / ``.csv``: tab-separated when the first line holds a tab (the STS benchmark files are
      tab-separated despite their ``.csv`` name), else comma-separated CSV. The column is fixed by the first
      data row: its **last non-numeric cell** (for STS: column 7, the second sentence; the extra source
      columns some later rows carry are ignored). The first row is a header, and skipped, when none of its
      cells is a number while the second row has one. Rows with no text in that column are skipped.

    Tokenization adds the tokenizer's special tokens and truncates to ``max_length`` tokens. One sample per
    feed, so no padding is needed: ``padding="none"`` (the default) turns off any padding the tokenizer
    file configures, ``"longest"`` is the same for batches of one, and ``"max_length"`` pads every sample to
    ``max_length`` (the tokenizer's pad token, else ``[PAD]``/``<pad>``, else id 0; mask 0 there). A model
    with a static sequence length gets every sample padded and truncated to it.

    The model's inputs are filled by name (:data:`TOKEN_INPUTS`): ``input_ids``, ``attention_mask``,
    ``token_type_ids`` and ``position_ids``, each [1, seq] in the input's own int dtype. The file is read
    line by line: once up front to count the samples (``limit`` picks them evenly spaced), then once per
    iteration.
    """

    def __init__(self, path: str | Path, specs: list[InputSpec], *, tokenizer: str | Path, max_length: int = 128,
                 limit: int | None = None, padding: str = "none") -> None:
        tk = import_tokenizers()
        self.path, self.specs = Path(path), list(specs)
        if padding not in PADDING:
            raise CalibrationError(f"unknown padding '{padding}'; valid modes: {', '.join(PADDING)}")
        if max_length < 1:
            raise CalibrationError(f"max_length must be a positive number of tokens, got {max_length}")
        self.roles = token_roles(self.specs, "text source")
        self.notes: dict[str, None] = {}
        static = static_seq_len(self.specs)
        if static is not None:
            max_length, padding = static, "max_length"
            self.notes[f"padded and truncated to the model's static sequence length {static}"] = None
        self.max_length, self.padding = max_length, padding
        tok_path = Path(tokenizer).expanduser()
        if tok_path.is_dir():
            tok_path = tok_path / "tokenizer.json"
        if not tok_path.is_file():
            raise CalibrationError(f"tokenizer file not found: {tok_path} (give a Hugging Face tokenizer.json)")
        try:
            self.tokenizer = tk.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise CalibrationError(f"cannot load tokenizer {tok_path}: {e} (expected a Hugging Face tokenizers "
                                   "tokenizer.json)") from e
        self.tokenizer_path = tok_path
        self._configure_tokenizer()
        suffix = self.path.suffix.lower()
        self.kind = "jsonl" if suffix == ".jsonl" else "table" if suffix in (".tsv", ".csv") else "lines"
        self.field: str | None = None  # jsonl: the field used
        self.column: int | None = None  # table: the 0-based column used
        self.column_name: str | None = None  # table: its header, if the file has one
        self.delimiter, self.header = "\t", False
        try:
            if self.kind == "jsonl":
                self._plan_jsonl()
            elif self.kind == "table":
                self._plan_table()
            self.total = sum(1 for _ in self._texts())
        except UnicodeDecodeError as e:
            raise CalibrationError(f"text calibration file {self.path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise CalibrationError(f"cannot read text calibration file {self.path}: {e}") from e
        if self.total == 0:
            raise CalibrationError(f"text calibration file {self.path} holds no text samples")
        self.indices = evenly_spaced(self.total, limit)

    def _configure_tokenizer(self) -> None:
        tok = self.tokenizer
        tok.enable_truncation(self.max_length)
        if self.padding != "max_length":
            tok.no_padding()
            return
        pad = tok.padding
        if pad is not None:
            pad_id, pad_token = pad["pad_id"], pad["pad_token"]
        else:
            found = [(t, tok.token_to_id(t)) for t in ("[PAD]", "<pad>", "<|pad|>") if tok.token_to_id(t) is not None]
            pad_token, pad_id = found[0] if found else (tok.id_to_token(0) or "[PAD]", 0)
        tok.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad_token)

    def _lines(self) -> Generator[tuple[int, str], None, None]:
        """(1-based line number, line without its newline) for every non-blank line."""
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line.rstrip("\r\n")

    def _plan_jsonl(self) -> None:
        with contextlib.closing(self._lines()) as lines:
            first = next(lines, None)
        if first is None:
            return
        obj = self._json(*first)
        if isinstance(obj, dict):
            if isinstance(obj.get("text"), str):
                self.field = "text"
            else:
                self.field = next((k for k, v in obj.items() if isinstance(v, str)), None)
                if self.field is None:
                    raise CalibrationError(f"line {first[0]} of {self.path} is a JSON object with no string field; "
                                           "JSONL calibration text needs a \"text\" field")

    def _json(self, n: int, line: str) -> Any:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"line {n} of {self.path} is not JSON ({e.msg}); a .jsonl file holds one JSON "
                                   "object per line") from e
        if not isinstance(obj, (dict, str)):
            raise CalibrationError(f"line {n} of {self.path} holds a JSON {type(obj).__name__}, not an object or string")
        return obj

    def _rows(self) -> Generator[tuple[int, list[str]], None, None]:
        """(1-based row number, cells) for every non-blank row of a TSV/CSV file."""
        if self.delimiter == "\t":
            for n, line in self._lines():
                yield n, line.split("\t")
            return
        with open(self.path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(c.strip() for c in row):
                    yield reader.line_num, row

    def _plan_table(self) -> None:
        with contextlib.closing(self._lines()) as lines:
            first = next(lines, None)
        if first is None:
            return
        self.delimiter = "\t" if "\t" in first[1] or self.path.suffix.lower() == ".tsv" else ","
        with contextlib.closing(self._rows()) as rows:
            head = [cells for _, (_, cells) in zip(range(2), rows)]
        row0 = head[0]
        self.header = (len(head) == 2 and not any(is_number(c) for c in row0 if c.strip())
                       and any(is_number(c) for c in head[1] if c.strip()))
        data = head[1] if self.header else row0
        text_cols = [i for i, c in enumerate(data) if c.strip() and not is_number(c)]
        if not text_cols:
            raise CalibrationError(f"the first data row of {self.path} has no text column (all its cells are numbers)")
        self.column = text_cols[-1]
        if self.header and self.column < len(row0):
            self.column_name = row0[self.column].strip()

    def _texts(self) -> Generator[tuple[int, str], None, None]:
        """(line number, text) for every sample, in file order."""
        if self.kind == "lines":
            for n, line in self._lines():
                yield n, line.strip()
        elif self.kind == "jsonl":
            for n, line in self._lines():
                obj = self._json(n, line)
                if isinstance(obj, dict):
                    text = obj.get(self.field) if self.field is not None else None
                    if not isinstance(text, str):
                        raise CalibrationError(f"line {n} of {self.path} has no string field '{self.field or 'text'}'")
                else:
                    text = obj
                if text.strip():
                    yield n, text.strip()
        else:
            rows = self._rows()
            if self.header:
                next(rows, None)
            assert self.column is not None
            for n, row in rows:
                text = row[self.column].strip() if self.column < len(row) else ""
                if text:
                    yield n, text

    def encode(self, text: str) -> dict[str, np.ndarray]:
        """The feed for one text (tokenized, truncated/padded as configured)."""
        enc = self.tokenizer.encode(text)
        return token_feed(self.specs, self.roles, enc.ids, enc.attention_mask, enc.type_ids)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if not self.indices:
            return
        wanted, last = set(self.indices), self.indices[-1]
        with contextlib.closing(self._texts()) as texts:
            for i, (n, text) in enumerate(texts):
                if i in wanted:
                    feed = self.encode(text)
                    if feed[next(iter(feed))].shape[1] == 0:
                        raise CalibrationError(f"line {n} of {self.path} tokenizes to no tokens with {self.tokenizer_path}")
                    yield feed
                if i >= last:
                    break

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return f"tokenized text for '{name}' from {self.path.name}"

    def describe(self) -> str:
        if self.kind == "jsonl":
            fmt = f"JSONL, field '{self.field}'" if self.field else "JSONL strings"
        elif self.kind == "table":
            sep = "tab" if self.delimiter == "\t" else "comma"
            name = f" '{self.column_name}'" if self.column_name else ""
            fmt = f"{sep}-separated, column {(self.column or 0) + 1}{name}" + (", header skipped" if self.header else "")
        else:
            fmt = "one sample per line"
        return (f"text file {self.path} ({count_text(len(self), self.total, 'samples')}; {fmt}; tokenizer "
                f"{self.tokenizer_path}, max_length {self.max_length}, padding {self.padding}; "
                + "; ".join([f"inputs {roles_text(self.roles)}", *self.notes]) + ")")
