"""Which models ``onnxq batch`` converts, and into which files: folder and manifest jobs, checked.

What batch refuses or records as failed, and why:

* Output names (a manifest's ``name``, a folder model's file stem) are plain file stems: no path
  separators, not empty, no leading dot, no control characters, at most 200 bytes, unique (also
  ignoring case), so nothing is written outside ``-o OUTDIR``.
* In folder mode a ``*.onnx`` that is a symbolic link resolving outside the folder, a broken link, a
  directory or a special file is recorded as failed and never opened; ``-o`` may not be the input
  folder. Manifest paths are the manifest author's explicit choice and may point anywhere (relative
  ones are relative to the manifest), but must be regular files. External data must stay beside its
  model in both modes (checked by :mod:`onnxq.model`).
* No job's output may be another job's input.

Manifest format (strict: unknown keys and ill-typed values are errors)::

    [defaults]                      # optional, applies to every model
    preset = "w8a8"
    calib = "images/"
    calib_preprocess = "torch"

    [[model]]
    path = "mobilenetv2.onnx"       # relative to the manifest
    [[model]]
    path = "minilm.onnx"
    name = "minilm-int8"            # output file stem (default: the input's)
    recipe = "transformer.toml"     # instead of preset
    calib = "sentences.txt"
    tokenizer = "tokenizer.json"
    exclude_op = ["MatMul"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError, RecipeError
from onnxq.recipe import Recipe, load_recipe, preset, recipe_to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BatchJob", "check_output_name", "jobs_from_folder", "jobs_from_manifest", "MANIFEST_KEYS"]

_CALIB_KEYS = ("calib", "calib_preprocess", "calib_size", "calib_resize", "calib_crop", "tokenizer", "max_length", "seq_len")
MANIFEST_KEYS = ("path", "name", "preset", "recipe", *_CALIB_KEYS, "exclude_op", "exclude_node", "exclude_regex")
_MAX_NAME_BYTES = 200  # leaves room for ".NAME.onnx.data.<pid>.XXXXXXXX.tmp" within a 255-byte file name
_STR_KEYS = ("path", "name", "preset", "recipe", "calib", "calib_preprocess", "tokenizer")
_INT_KEYS = ("calib_size", "calib_resize", "calib_crop", "max_length", "seq_len")
_LIST_KEYS = ("exclude_op", "exclude_node", "exclude_regex")

@dataclass
class BatchJob:
    """One model to convert: where from, where to, with which recipe and calibration options.

    ``refused``: a reason the job must not run at all (a symlink out of the input folder, a special
    file...); it is recorded as failed without the input ever being opened.
    """

    name: str
    model: Path
    output: Path
    recipe: Recipe
    calibration: dict[str, Any] = field(default_factory=dict)
    refused: str = ""

    def fingerprint(self) -> str:
        """sha256 of the input model, the recipe and the calibration options."""
        from onnxq.model import model_hash

        try:
            model_sha = model_hash(self.model)
        except (OSError, OnnxqError):
            model_sha = "unreadable"
        doc = json.dumps({"model": model_sha, "recipe": recipe_to_dict(self.recipe), "calib": self.calibration},
                         sort_keys=True, default=str)  # fmt: skip
        return hashlib.sha256(doc.encode()).hexdigest()


def check_output_name(name: object, where: str) -> str:
    """``name`` if it is a plain output file stem, else RecipeError naming ``where`` and the fix.

    The name becomes ``OUTDIR/<name>.onnx`` and state files in ``OUTDIR/.onnxq-batch/``, so it must not
    be able to point anywhere else: no path separators, no '.'/'..', no leading dot (hidden files, the
    state folder), no control characters (NUL, terminal escapes), not empty, not over 200 bytes.
    """
    fix = "use a plain file name such as name = \"model-int8\" (letters, digits, '-', '_', '.')"
    if not isinstance(name, str):
        raise RecipeError(f"{where}: name must be a string, got {name!r}; {fix}")
    problem = ""
    if not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator, which would write outside the output folder"
    elif name.startswith("."):
        problem = "starts with '.' (hidden files, '.', '..' and the state folder are not output names)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        problem = f"is longer than {_MAX_NAME_BYTES} bytes"
    if problem:
        raise RecipeError(f"{where}: output name {name!r} {problem}; {fix}")
    return name


def _apply(recipe: Recipe, entry: dict[str, Any], where: str) -> Recipe:
    """The entry's exclude_* lists and calib_size on top of its recipe (values already typed by _check_entry)."""
    ex = recipe.exclude
    try:  # the recipe's own rules check each op type and regex; the error says which manifest entry
        ex = dataclasses.replace(
            ex,
            op_types=ex.op_types + tuple(entry.get("exclude_op", ())),
            names=ex.names + tuple(entry.get("exclude_node", ())),
            name_regex=ex.name_regex + tuple(entry.get("exclude_regex", ())),
        )
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from exc
    calib = recipe.calibration
    if entry.get("calib_size"):
        calib = dataclasses.replace(calib, samples=int(entry["calib_size"]))
    return recipe.with_(exclude=ex, calibration=calib)


def _calib_options(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    opts = {k: entry[k] for k in _CALIB_KEYS if k in entry and k != "calib_size"}
    for key in ("calib", "tokenizer"):
        if key in opts and not str(opts[key]).startswith("random") and not Path(opts[key]).is_absolute():
            opts[key] = str((base / opts[key]).resolve())
    return opts


def _refusal(path: Path, root: Path | None) -> str:
    """Why the input ``path`` must not be opened ('' when it may): links out of ``root``, non-regular files."""
    if path.is_symlink():
        if not path.exists():
            return f"{path} is a broken symbolic link (to {os.readlink(path)!r}); fix or remove it"
        target = path.resolve()
        if root is not None and not target.is_relative_to(root):
            return (f"{path} is a symbolic link to {target}, outside the input folder {root}; refusing to read it "
                    "(copy the model into the folder, or list it in a manifest)")  # fmt: skip
    if not path.exists():
        return f"model file not found: {path}; check the path"
    if path.is_dir():
        return f"{path} is a directory, not a model file; name the .onnx file inside it"
    if not path.is_file():
        return f"{path} is not a regular file (a device, FIFO or socket); refusing to read it"
    return ""


def jobs_from_folder(folder: Path, outdir: Path, recipe: Recipe, calibration: dict[str, Any]) -> list[BatchJob]:
    """Every ``*.onnx`` entry directly in ``folder``, with one recipe.

    Entries that must not be read (symlinks out of the folder, broken links, directories, devices,
    names that are not plain file stems) become refused jobs: recorded as failed, never opened.
    """
    root = folder.resolve()
    if outdir.resolve() == root:
        raise OnnxqError(f"output folder {outdir} is the input folder {folder}: outputs would replace the inputs and "
                         "be read as inputs on the next run; choose another -o folder")  # fmt: skip
    entries = sorted(folder.glob("*.onnx"))
    if not entries:
        raise OnnxqError(f"folder {folder} holds no *.onnx files")
    jobs = []
    for p in entries:
        reason = _refusal(p, root)
        try:
            check_output_name(p.stem, f"model {p.name!r} in {folder}")
        except RecipeError as exc:
            reason = reason or f"{exc} (rename the file)"
        model = p.resolve() if not reason else p  # the worker opens the checked target, not the link
        jobs.append(BatchJob(p.stem, model, outdir / f"{p.stem}.onnx", recipe, dict(calibration), refused=reason))
    return jobs


def _check_entry(entry: dict[str, Any], where: str) -> None:
    """RecipeError for unknown keys and ill-typed values of one manifest entry (defaults merged in)."""
    for key, value in entry.items():
        if key not in MANIFEST_KEYS:
            raise RecipeError(f"unknown key '{key}' in {where}; valid keys: {', '.join(MANIFEST_KEYS)}")
        if key in _STR_KEYS and not isinstance(value, str):
            raise RecipeError(f"{where}: {key} must be a string, got {value!r}")
        if key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"{where}: {key} must be a positive integer, got {value!r}")
        if key in _LIST_KEYS and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise RecipeError(f"{where}: {key} must be a list of strings such as [\"MatMul\"], got {value!r}")
    from onnxq.calibration.sources import PREPROCESS

    if entry.get("calib_preprocess", PREPROCESS[0]) not in PREPROCESS:
        raise RecipeError(f"{where}: calib_preprocess {entry['calib_preprocess']!r} is not one of {', '.join(PREPROCESS)}")
    if "path" in entry and not entry["path"].strip():
        raise RecipeError(f"{where}: path is empty; give the model file, relative to the manifest")
    if "preset" in entry and "recipe" in entry:
        raise RecipeError(f"{where} gives both preset and recipe")


def _manifest_tables(manifest: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``[defaults]`` table and the ``[[model]]`` tables of a manifest, structurally checked."""
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"manifest {manifest} is not readable TOML: {exc}") from exc
    for key in data:
        if key not in ("defaults", "model"):
            raise RecipeError(f"unknown key '{key}' in manifest {manifest}; valid keys: defaults, model")
    defaults = data.get("defaults", {})
    entries = data.get("model", [])
    if not isinstance(defaults, dict):
        raise RecipeError(f"defaults in manifest {manifest} must be a table: write [defaults] above its keys")
    for key in ("path", "name"):
        if key in defaults:
            raise RecipeError(f"[defaults] of {manifest} sets {key}, which is per model: move it into each [[model]]")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"manifest {manifest} lists no models: add [[model]] tables with a path")
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise RecipeError(f"model #{i + 1} of {manifest} is not a table: write each model as a [[model]] table")
    return defaults, entries


def jobs_from_manifest(
    manifest: Path, outdir: Path, recipe: Recipe | None, calibration: dict[str, Any], *, calib_size: int | None = None
) -> list[BatchJob]:
    """Jobs from a TOML manifest; per-model keys override ``[defaults]``, which override the CLI's.

    ``calib_size``: the samples per model where the manifest sets no ``calib_size`` (the CLI's --calib-size).

    Paths may point anywhere (the manifest's author chose them) but must be regular files; names must
    be plain, unique file stems (see :func:`check_output_name`).
    """
    defaults, entries = _manifest_tables(manifest)
    base = manifest.parent
    jobs: list[BatchJob] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(entries):
        where = f"[[model]] #{i + 1} of {manifest}"
        entry = {**({"calib_size": calib_size} if calib_size else {}), **defaults, **raw}
        _check_entry(entry, where)
        if "path" not in raw:
            raise RecipeError(f"{where} has no path")
        if "recipe" in entry:
            r = load_recipe(base / entry["recipe"])
        elif "preset" in entry:
            r = preset(entry["preset"])
        else:
            r = recipe or preset("w8a8")
        path = (base / entry["path"]).resolve()
        name = check_output_name(raw["name"], where) if "name" in raw else path.stem
        if name.casefold() in seen:
            raise RecipeError(f"manifest {manifest} gives two models the output name {name!r} ([[model]] "
                              f"#{seen[name.casefold()] + 1} and #{i + 1}): set a different name = ... on one")  # fmt: skip
        seen[name.casefold()] = i
        jobs.append(BatchJob(name, path, outdir / f"{name}.onnx", _apply(r, entry, where),
                             {**calibration, **_calib_options(entry, base)}, refused=_refusal(path, None)))  # fmt: skip
    return jobs
