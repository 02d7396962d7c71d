"""What onnxq promises about where it writes, and how its commands end.

- Every destination is checked before any work: an output that exists and is not a regular file (a FIFO,
  a device, a socket, a symbolic link to one, a directory) is refused with one line and left as it was;
  so are report folders that are files, unwritable folders, empty paths and paths ending in '/'.
- No command writes over a file it reads: the model and its external data, the calibration data (a
  file, or a file inside the calibration folder), the evaluation data, the tokenizer, the calibration
  cache, the recipe; by path, symbolic link or hard link; nor may two destinations collide.
- The library writers (save_model, save_cache, Report.write_json, write_html, quantize_file,
  calibrate_file) refuse special files too, and write files with mode 0666 & ~umask (0644), not 0600.
- Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), with "no output was written" and no temporary
  file left; a temporary file left by a killed run is removed by the next write to that destination,
  never one of a live writer.
- With --json, every command's error is also one JSON object on stdout ({"error", "exit_code"}).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxq
import onnxq.quantization as oq
from onnxq.calibration.cache import save_cache
from onnxq.cli import main
from onnxq.errors import ModelSaveError, OnnxqError
from onnxq.model import save_model
from onnxq.quantization import CalibrationOptions, calibrate_file, quantize_file
from onnxq.recipe import Recipe, preset
from onnxq.report import Report
from onnxq.report_html import write_html

# ---------------------------------------------------------------- fixtures


def _conv_model(path: Path, *, external: str | None = None) -> Path:
    """Conv -> Relu, input 'x' [N, 3, 8, 8]; with ``external``, the weights in that file beside it."""
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external is not None, all_tensors_to_one_file=True,
                    location=external, size_threshold=0)  # fmt: skip
    return path


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return _conv_model(tmp_path / "m.onnx")


@pytest.fixture()
def npz(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32))
    return path


@pytest.fixture()
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any calibration or quantization now fails the test: refusals must come before the work."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantize_model ran although a destination was refused")

    monkeypatch.setattr(oq, "quantize_model", forbidden)


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _refused(code: int, err: str, *needles: str) -> None:
    """Exit 1, one 'error:' line, naming everything in ``needles``, no traceback, no 'unexpected'."""
    text = " ".join(err.split())
    assert code == 1, f"exit code {code}: {err}"
    assert text.startswith("error:") and "Traceback" not in err and "unexpected" not in text, err
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry of ``folder`` (recursively): its type bits and, for regular files, its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_mode & 0o170000, p.read_bytes() if p.is_file() and not p.is_symlink() else None)
    return out


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---------------------------------------------------------------- 1. special files are never replaced


def _special(tmp_path: Path, kind: str) -> Path:
    """A FIFO, a Unix socket, or a symbolic link to a folder, at ``tmp_path / kind``."""
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:
        (tmp_path / "folder").mkdir()
        path.symlink_to(tmp_path / "folder")
    return path


@pytest.mark.parametrize("kind, what", [("fifo", "named pipe (FIFO)"), ("socket", "socket"), ("dirlink", "is a directory")])
def test_quantize_refuses_a_special_output_before_calibrating(tmp_path: Path, model: Path, no_work: None, kind: str,
                                                              what: str) -> None:  # fmt: skip
    path = _special(tmp_path, kind)
    before = _snapshot(tmp_path)
    code, _, err = _run("quantize", model, "-o", path, "--calib", "random:2")
    _refused(code, err, str(path), what)
    assert _snapshot(tmp_path) == before


def test_quantize_refuses_a_symlink_to_a_device_and_leaves_both(tmp_path: Path, model: Path, no_work: None) -> None:
    link = tmp_path / "null.onnx"
    link.symlink_to(os.devnull)
    before = os.stat(os.devnull)
    code, _, err = _run("quantize", model, "-o", link, "--calib", "random:2")
    _refused(code, err, str(link), "symbolic link to", "character device")
    assert link.is_symlink() and os.readlink(link) == os.devnull
    after = os.stat(os.devnull)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_calibrate_refuses_a_fifo_output(tmp_path: Path, model: Path, no_work: None) -> None:
    fifo = tmp_path / "stats.json"
    os.mkfifo(fifo)
    code, _, err = _run("calibrate", model, "--calib", "random:2", "-o", fifo)
    _refused(code, err, str(fifo), "statistics file", "FIFO")
    assert fifo.is_fifo()


@pytest.mark.parametrize("name", ["report.json", "report.html"])
def test_report_files_that_are_special_are_refused_before_any_work(tmp_path: Path, model: Path, name: str,
                                                                    no_work: None) -> None:  # fmt: skip
    (tmp_path / "rep").mkdir()
    os.mkfifo(tmp_path / "rep" / name)
    code, _, err = _run("quantize", model, "-o", tmp_path / "q.onnx", "--calib", "random:2", "--report", tmp_path / "rep")
    _refused(code, err, str(tmp_path / "rep" / name), "FIFO")
    assert (tmp_path / "rep" / name).is_fifo() and not (tmp_path / "q.onnx").exists()


def test_external_data_sibling_that_is_special_is_refused(tmp_path: Path, model: Path, no_work: None) -> None:
    os.mkfifo(tmp_path / "q.onnx.data")
    code, _, err = _run("quantize", model, "-o", tmp_path / "q.onnx", "--calib", "random:2")
    _refused(code, err, "q.onnx.data", "FIFO")
    assert (tmp_path / "q.onnx.data").is_fifo()


def _writers(tmp_path: Path, model: Path) -> dict[str, Callable[[Path], object]]:
    """Every library function that writes a file, each given only its destination."""
    proto = onnx.load(model)
    cal = CalibrationOptions(source="random:2")
    return {
        "save_model": lambda p: save_model(proto, p),
        "save_model external data": lambda p: save_model(proto, p.with_name("ok.onnx"), external_data=True),
        "save_cache": lambda p: save_cache(p, model_sha256="0" * 64, spec=Recipe().calibration, ranges={},
                                           source="random", provider=None, samples=0),  # fmt: skip
        "Report.write_json": lambda p: Report().write_json(p),
        "write_html": lambda p: write_html(Report().to_dict(), p, charts=False),
        "quantize_file": lambda p: quantize_file(model, p, preset("w8a8"), calibration=cal),
        "calibrate_file": lambda p: calibrate_file(model, p, preset("w8a8"), calibration=cal),
    }


@pytest.mark.parametrize("writer", ["save_model", "save_model external data", "save_cache", "Report.write_json",
                                    "write_html", "quantize_file", "calibrate_file"])  # fmt: skip
def test_library_writers_refuse_a_fifo(tmp_path: Path, model: Path, writer: str) -> None:
    fifo = tmp_path / ("ok.onnx.data" if "external" in writer else "out")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a writer that opens the FIFO must not block the test
    try:
        with pytest.raises(ModelSaveError, match="FIFO"):
            _writers(tmp_path, model)[writer](fifo)
    finally:
        os.close(reader)
    assert fifo.is_fifo()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- 2. never write over what is read


def test_calibrate_never_writes_over_its_model(tmp_path: Path, model: Path, no_work: None) -> None:
    before = model.read_bytes()
    code, _, err = _run("calibrate", model, "--calib", "random:4", "-o", model)
    _refused(code, err, "refusing to overwrite the input model", str(model))
    assert model.read_bytes() == before


def test_quantize_never_writes_over_its_calibration_data(tmp_path: Path, model: Path, npz: Path, no_work: None) -> None:
    before = npz.read_bytes()
    code, _, err = _run("quantize", model, "-o", npz, "--calib", npz)
    _refused(code, err, "calibration data (--calib)", str(npz))
    assert npz.read_bytes() == before


def _read_cases(tmp_path: Path, model: Path, npz: Path) -> dict[str, tuple[list[str | Path], str]]:
    """(the command's arguments, what the error must name) for each kind of file a run reads."""
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    ext = _conv_model(tmp_path / "ext" / "e.onnx", external="q.onnx.data")
    os.link(model, tmp_path / "hard.onnx")
    (tmp_path / "link.onnx").symlink_to(model)
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "w8a8"\n')
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    cache = tmp_path / "stats.json"
    cache.write_text("{}")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.json").symlink_to(npz)
    q = ["quantize", model, "--calib", "random:2"]
    return {
        "model (hard link)": ([*q, "-o", tmp_path / "hard.onnx"], "input model"),
        "model (symbolic link)": ([*q, "-o", tmp_path / "link.onnx"], "input model"),
        "external data": (["quantize", ext, "--calib", "random:2", "-o", ext.with_name("q.onnx.data")],
                          "external data file of the input model"),
        "external data as the output's .data": (["quantize", ext, "--calib", "random:2", "-o", ext.with_name("q.onnx")],
                                                "external data file of the input model"),
        "file in the calibration folder": (["quantize", model, "--calib", folder, "-o", folder / "a.npz"],
                                           "calibration data (--calib) folder"),
        "new sample in the calibration folder": (["quantize", model, "--calib", folder, "-o", folder / "b.npy"],
                                                 "calibration data (--calib) folder"),
        "evaluation data": ([*q, "--eval", npz, "--accuracy-budget", "sqnr=10", "-o", npz], "evaluation data (--eval)"),
        "calibration cache": (["quantize", model, "--calib-cache", cache, "-o", cache], "calibration cache (--calib-cache)"),
        "recipe": (["quantize", model, "--recipe", recipe, "--calib", "random:2", "-o", recipe], "recipe (--recipe)"),
        "calibrate's recipe": (["calibrate", model, "--recipe", recipe, "--calib", "random:2", "-o", recipe], "recipe (--recipe)"),
        "tokenizer": ([*q, "--tokenizer", tok, "-o", tok], "tokenizer (--tokenizer)"),
        "report file linked to the calibration data": ([*q[:2], "--calib", npz, "-o", tmp_path / "q.onnx", "--report", tmp_path / "rep"],
                                                       "calibration data (--calib)"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["model (hard link)", "model (symbolic link)", "external data",
                                  "external data as the output's .data", "file in the calibration folder",
                                  "new sample in the calibration folder",
                                  "evaluation data", "calibration cache", "recipe", "calibrate's recipe", "tokenizer",
                                  "report file linked to the calibration data"])  # fmt: skip
def test_no_command_writes_over_a_file_it_reads(tmp_path: Path, model: Path, npz: Path, case: str, no_work: None) -> None:
    args, role = _read_cases(tmp_path, model, npz)[case]
    before = _snapshot(tmp_path)
    code, _, err = _run(*args)
    _refused(code, err, "refusing to", role)
    assert _snapshot(tmp_path) == before


def test_an_earlier_output_beside_the_calibration_samples_may_be_replaced(tmp_path: Path, model: Path) -> None:
    """A model folder holding its test_data_set: rerunning into the same output there is not overwriting data."""
    tds = tmp_path / "test_data_set_0"
    tds.mkdir()
    onnx.save_tensor(numpy_helper.from_array(np.zeros((1, 3, 8, 8), np.float32), "x"), str(tds / "input_0.pb"))
    for _ in range(2):
        code, _, err = _run("quantize", model, "--calib", tmp_path, "-o", tmp_path / "m.int8.onnx", "--no-progress")
        assert code == 0, err


def test_the_library_refuses_the_callers_reads(tmp_path: Path, model: Path) -> None:
    from onnxq.destinations import Read

    manifest = tmp_path / "jobs.toml"
    manifest.write_text("")

    with pytest.raises(OnnxqError, match="refusing to overwrite the batch manifest"):
        quantize_file(model, manifest, preset("w8a8"), calibration=CalibrationOptions(source="random:2"),
                      reads=[Read(manifest, "batch manifest")])  # fmt: skip
    assert manifest.read_text() == ""


# ---------------------------------------------------------------- 7. every destination checked up front


def test_report_pointing_at_a_file_is_refused_before_the_model_is_written(tmp_path: Path, model: Path,
                                                                          no_work: None) -> None:  # fmt: skip
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = _run("quantize", model, "-o", tmp_path / "q.onnx", "--calib", "random:2", "--report", tmp_path / "notes.txt")
    _refused(code, err, "report folder (--report)", str(tmp_path / "notes.txt"), "not a folder")
    assert not (tmp_path / "q.onnx").exists() and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("output, needle", [
    ("", "path is empty"),
    ("new/", "names a folder, not a file"),
    ("new/.", "names a folder, not a file"),
    (".", "names a folder, not a file"),
    ("sub", "is a directory"),
    ("notes.txt/q.onnx", "is a file, not a folder"),
    ("rep", "are the same path"),
    ("rep/report.json", "are the same path"),
])  # fmt: skip
def test_bad_output_paths_are_one_line_before_any_work(tmp_path: Path, model: Path, output: str, needle: str,
                                                        no_work: None, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    before = _snapshot(tmp_path)
    code, _, err = _run("quantize", model, "-o", output, "--calib", "random:2", "--report", "rep")
    _refused(code, err, needle)
    assert _snapshot(tmp_path) == before


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path: Path, model: Path, no_work: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway; a read-only file system is what stops it
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    try:
        code, _, err = _run("quantize", model, "-o", ro / "sub" / "q.onnx", "--calib", "random:2")
    finally:
        ro.chmod(0o755)
    _refused(code, err, str(ro), "not writable")
    assert not (ro / "sub").exists()


def test_an_ordinary_run_with_a_report_still_works(tmp_path: Path, model: Path, npz: Path, umask_022: None) -> None:
    code, _, err = _run("quantize", model, "-o", tmp_path / "out" / "q.onnx", "--calib", npz, "--report", tmp_path / "rep",
                        "--no-progress")  # fmt: skip
    assert code == 0, err
    for p in (tmp_path / "out" / "q.onnx", tmp_path / "rep" / "report.json", tmp_path / "rep" / "report.html"):
        assert p.stat().st_mode & 0o777 == 0o644, p


# ---------------------------------------------------------------- 10 / 13. signals and temporary files

_SIGNAL_MID_WRITE = r"""
import os, signal, sys
import onnxq.model_save as om
real, sig = om._write_all, getattr(signal, sys.argv[1])
def write_then_signal(f, data):
    real(f, data[: len(data) // 2])
    os.kill(os.getpid(), sig)
    real(f, data[len(data) // 2:])
om._write_all = write_then_signal
from onnxq.cli import main
sys.argv = ["onnxq", *sys.argv[2:]]
main()
"""


def _python(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run this onnxq (the one the tests import) in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(onnxq.__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_writing_exits_128_plus_signal_and_leaves_nothing(tmp_path: Path, model: Path, sig: str,
                                                                         code: int) -> None:  # fmt: skip
    out = tmp_path / "out" / "q.onnx"
    run = _python("-c", _SIGNAL_MID_WRITE, sig, "quantize", model, "-o", out, "--calib", "random:2", "--no-progress")
    assert run.returncode == code, run.stderr
    assert "no output was written" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists() and not list(out.parent.iterdir())


def test_a_temp_file_left_by_a_killed_run_is_removed_by_the_next_save(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "q.onnx"
    killed = _python("-c", _SIGNAL_MID_WRITE, "SIGKILL", "quantize", model, "-o", out, "--calib", "random:2", "--no-progress")
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    old = time.time() - 3600
    os.utime(left, (old, old))
    save_model(onnx.load(model), out)
    assert not left.exists() and out.is_file()


def test_temp_files_of_live_or_recent_writers_are_kept(tmp_path: Path, model: Path) -> None:
    from onnxq.destinations import remove_stale_temps, temp_beside

    out = tmp_path / "q.onnx"
    live: list[Path] = []
    temp_beside(out, live).close()  # this process: alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    recent = live[0].with_name(live[0].name.replace(f"onnxq{os.getpid()}-", f"onnxq{int(dead.stdout)}-"))
    recent.write_bytes(b"")  # a dead writer's file that changed a moment ago (another PID namespace?)
    other = tmp_path / ".other.onnx.onnxq1-00000000.abcdefgh.tmp"
    other.write_bytes(b"")
    old = time.time() - 3600
    for p in (live[0], other):
        os.utime(p, (old, old))
    assert remove_stale_temps(out) == []
    save_model(onnx.load(model), out)
    assert live[0].exists() and recent.exists() and other.exists()


# ---------------------------------------------------------------- 13. exit codes, --json errors, file modes


def test_ctrl_c_exits_130_with_one_line(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(oq, "quantize_model", interrupted)
    code, _, err = _run("quantize", model, "-o", tmp_path / "q.onnx", "--calib", "random:2")
    assert code == 130 and " ".join(err.split()) == "error: interrupted; no output was written"
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("args, code", [
    (["quantize", "missing.onnx", "-o", "q.onnx", "--calib", "random:2", "--json"], 1),
    (["quantize", "m.onnx", "--calib", "random:2", "--json"], 2),  # no -o: a usage error
    (["calibrate", "missing.onnx", "-o", "s.json", "--calib", "random:2", "--json"], 1),
    (["batch", "missing-folder", "-o", "out", "--json"], 2),
    (["compare", "missing.onnx", "m.onnx", "--calib", "random:2", "--json"], 1),
    (["inspect", "missing.onnx", "--json"], 1),
    (["presets", "--json", "--no-such-flag"], 2),
])  # fmt: skip
def test_json_errors_are_a_json_object_on_stdout(tmp_path: Path, model: Path, args: list[str], code: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    got, out, err = _run(*args)
    assert got == code, err
    doc = json.loads(out)
    assert doc["exit_code"] == code and doc["error"] and doc["error"] in " ".join(err.split()) + out
    assert "Traceback" not in err


def test_written_json_files_get_the_usual_mode_not_0600(tmp_path: Path, model: Path, npz: Path, umask_022: None) -> None:
    code, _, err = _run("calibrate", model, "--calib", npz, "-o", tmp_path / "stats.json", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "stats.json").stat().st_mode & 0o777 == 0o644
    os.umask(0o027)
    Report().write_json(tmp_path / "r.json")
    save_model(onnx.load(model), tmp_path / "q.onnx")
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("r.json", "q.onnx")] == [0o640, 0o640]


# ---------------------------------------------------------------- fuzzing: whatever is accepted is written safely

#: What an output or report path can be; each builder makes it under ``root`` and returns the path as typed.
_PATH_KINDS: dict[str, Callable[[Path], str]] = {
    "new": lambda r: str(r / "q.onnx"),
    "new folder": lambda r: str(r / "a" / "b" / "q.onnx"),
    "existing file": lambda r: _touch(r / "old.onnx"),
    "existing folder": lambda r: _mkdir(r / "d"),
    "fifo": lambda r: _fifo(r / "p"),
    "link to fifo": lambda r: _link(r / "lp", _fifo(r / "p")),
    "link to input": lambda r: _link(r / "li", str(r / "in.onnx")),
    "hard link to input": lambda r: _hard(r / "hi", r / "in.onnx"),
    "hard link to calibration data": lambda r: _hard(r / "hc", r / "calib.npz"),
    "input": lambda r: str(r / "in.onnx"),
    "calibration data": lambda r: str(r / "calib.npz"),
    "under a file": lambda r: str(Path(_touch(r / "f")) / "q.onnx"),
    "trailing slash": lambda r: str(r / "t") + "/",
    "empty": lambda r: "",
    "folder with special report files": lambda r: _special_report(r / "sr"),
    "shared": lambda r: str(r / "shared"),  # the same path for both: a collision
}


def _touch(p: Path) -> str:
    p.write_bytes(b"previous")
    return str(p)


def _mkdir(p: Path) -> str:
    p.mkdir(exist_ok=True)
    return str(p)


def _fifo(p: Path) -> str:
    if not p.exists():
        os.mkfifo(p)
    return str(p)


def _link(p: Path, target: str) -> str:
    if not p.is_symlink():
        p.symlink_to(target)
    return str(p)


def _hard(p: Path, target: Path) -> str:
    if not p.exists():
        os.link(target, p)
    return str(p)


def _special_report(p: Path) -> str:
    p.mkdir(exist_ok=True)
    _fifo(p / "report.json")
    return str(p)


@given(out_kind=st.sampled_from(sorted(_PATH_KINDS)), report_kind=st.sampled_from(["none", *sorted(_PATH_KINDS)]))
@settings(max_examples=120, deadline=None, derandomize=True, database=None)
def test_whatever_the_destination_check_accepts_is_written_without_damage(out_kind: str, report_kind: str) -> None:
    """Any output x report path kind: refused with nothing changed, or written with every read file,
    special file and link intact, the output a regular file."""
    from onnxq.destinations import Read, check_destinations
    from onnxq.quantization import output_destinations

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _conv_model(root / "in.onnx")
        np.savez(root / "calib.npz", x=np.zeros((1, 3, 8, 8), np.float32))
        out = _PATH_KINDS[out_kind](root)
        rep = None if report_kind == "none" else _PATH_KINDS[report_kind](root)
        before = _snapshot(root)
        reads = [Read(root / "in.onnx", "input model"), Read(root / "calib.npz", "calibration data (--calib)")]
        try:
            check_destinations(output_destinations(out, rep), reads)
        except ModelSaveError as exc:
            assert "\n" not in str(exc) and _snapshot(root) == before
            return
        save_model(onnx.load(root / "in.onnx"), out)
        if rep is not None:
            Report().write_json(Path(rep) / "report.json")
            write_html(Report().to_dict(), Path(rep) / "report.html", charts=False)
        after = _snapshot(root)
        changed = {k for k in before if after.get(k) != before[k]}
        written = {str(Path(p).resolve().relative_to(root.resolve())) for p in
                   [out, *([Path(rep) / "report.json", Path(rep) / "report.html"] if rep else [])]}  # fmt: skip
        assert changed <= written and {"in.onnx", "calib.npz"}.isdisjoint(changed)
        assert Path(out).is_file() and not Path(out).is_symlink()


def test_a_report_that_fails_to_write_leaves_no_model(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit code 1 means nothing was written: not the model without its report (disk full, say)."""
    import onnxq.destinations

    real = onnxq.destinations.temp_beside

    def full_for_html(dest: Path, temps: list[Path], mode: str = "wb") -> object:
        if dest.name == "report.html":
            raise OSError(28, "No space left on device")
        return real(dest, temps, mode)

    monkeypatch.setattr(onnxq.destinations, "temp_beside", full_for_html)
    code, _, err = _run("quantize", model, "-o", tmp_path / "q.onnx", "--calib", "random:2", "--report", tmp_path / "rep",
                        "--no-progress")  # fmt: skip
    _refused(code, err, "cannot write the report file (--report)", "report.html", "No space left on device")
    assert not (tmp_path / "q.onnx").exists()
