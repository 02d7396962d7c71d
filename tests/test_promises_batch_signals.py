"""What ``onnxq batch`` promises about paths, resumes and signals.

* Output names are plain file stems: a manifest ``name`` can never write outside ``-o OUTDIR`` (no
  ``..``, absolute paths, separators, ``.``/``..``, leading dots, control characters, empty names);
  two models may not share a name (not even by case); the error names the ``[[model]]`` entry and the
  fix, and nothing is written.
* A folder batch never follows a symlink out of the folder (nor opens broken links, folders or FIFOs):
  such entries are recorded as failed with a reason. ``-o`` may not be the input folder, and no model's
  output may replace another model's input. Manifest values are type-checked.
* Resume verifies an output before trusting it: a truncated or altered output is converted again, with a
  note saying so.
* SIGTERM or SIGINT to the batch stops every worker (none writes an output later), exits 143 or 130,
  and says which models were written; if the batch is SIGKILLed its workers stop too.
* No temporary or state file of a stopped run survives the next run into the same folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxq
from onnxq.batch import check_output_name
from onnxq.cli import main
from onnxq.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits-cnn.onnx"
CODE_ROOT = Path(onnxq.__file__).resolve().parent.parent  # the onnxq under test, for subprocesses
SLOW_CALIB = ("--calib", "random:1000000", "--calib-size", "1000000")  # minutes of calibration: killed long before


def _batch(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["batch", *args])
    return r.exit_code, r.stdout, " ".join(r.stderr.split())


def _manifest(tmp_path: Path, body: str) -> Path:
    shutil.copy(DIGITS, tmp_path / "digits.onnx")
    path = tmp_path / "m.toml"
    path.write_text(body)
    return path


def _toml_str(text: str) -> str:
    """``text`` as a TOML basic string (control characters escaped)."""
    return json.dumps(text)


# ------------------------------------------------------------------------------------------- names (item 5)
@pytest.mark.parametrize(
    "name",
    ["../escaped", "ABSOLUTE", "a/b", "x/", "a\\b", ".", "..", "", " ", ".onnxq-batch", "a\x00b",
     "\x1b[31mred", "n" * 201],  # fmt: skip
)
def test_manifest_name_cannot_leave_the_output_folder(tmp_path: Path, name: str) -> None:
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    manifest = _manifest(tmp_path, f'[[model]]\npath = "digits.onnx"\nname = {_toml_str(name)}\ncalib = "random:2"\n')
    out = tmp_path / "out"
    code, _, err = _batch(str(manifest), "-o", str(out))
    assert code == 1
    assert "[[model]] #1" in err and "output name" in err and "plain file name" in err, err
    assert not out.exists(), "a bad name is refused at load, before anything is written"
    assert not (tmp_path / "escaped.onnx").exists() and not (tmp_path / "abs.onnx").exists()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["..", "../x", "a/../..", "~", "x\\..\\y"]))
def test_any_accepted_name_stays_directly_in_the_output_folder(name: str) -> None:
    out = Path("/srv/out")
    try:
        check_output_name(name, "[[model]] #1 of m.toml")
    except RecipeError as exc:
        assert "\n" not in str(exc) and "[[model]] #1 of m.toml" in str(exc)
        return
    target = Path(os.path.normpath(out / f"{name}.onnx"))
    assert target.parent == out and not target.name.startswith(".")
    assert all(ord(c) >= 32 and ord(c) != 127 for c in name)


@pytest.mark.parametrize("names", [("twin", "twin"), ("Twin", "twin")])
def test_two_models_may_not_share_an_output_name(tmp_path: Path, names: tuple[str, str]) -> None:
    body = "".join(f'[[model]]\npath = "digits.onnx"\nname = "{n}"\n' for n in names)
    code, _, err = _batch(str(_manifest(tmp_path, body)), "-o", str(tmp_path / "out"))
    assert code == 1 and "two models the output name" in err and "#1 and #2" in err, err


def test_defaults_may_not_set_a_name_or_path(tmp_path: Path) -> None:
    body = '[defaults]\nname = "same"\n[[model]]\npath = "digits.onnx"\n'
    code, _, err = _batch(str(_manifest(tmp_path, body)), "-o", str(tmp_path / "out"))
    assert code == 1 and "[defaults]" in err and "sets name" in err, err


@pytest.mark.parametrize(
    ("entry", "message"),
    [('path = "digits.onnx"\nexclude_op = "Conv"', "exclude_op must be a list of strings"),
     ('path = "digits.onnx"\ncalib_size = 0', "calib_size must be a positive integer"),
     ('path = "digits.onnx"\ncalib_size = true', "calib_size must be a positive integer"),
     ("path = 5", "path must be a string"),
     ('path = ""', "path is empty"),
     ('path = "digits.onnx"\nname = 7', "name must be a string"),
     ('path = "digits.onnx"\ncalib_preprocess = "Torch"', "calib_preprocess 'Torch' is not one of torch")],  # fmt: skip
)
def test_manifest_values_are_type_checked(tmp_path: Path, entry: str, message: str) -> None:
    code, _, err = _batch(str(_manifest(tmp_path, f"[[model]]\n{entry}\n")), "-o", str(tmp_path / "out"))
    assert code == 1 and message in err and "[[model]] #1" in err, err


@pytest.mark.parametrize(
    ("body", "message"),
    [("model = [1, 2]\n", "is not a table"), ("model = []\n", "lists no models"),
     ('[defaults]\npreset = "w8a8"\n', "lists no models"), ("defaults = 3\n[[model]]\npath = 'digits.onnx'\n", "must be a table")],  # fmt: skip
)
def test_manifest_must_list_model_tables(tmp_path: Path, body: str, message: str) -> None:
    code, _, err = _batch(str(_manifest(tmp_path, body)), "-o", str(tmp_path / "out"))
    assert code == 1 and message in err, err


# ------------------------------------------------------------------------------ input and output paths (item 5)
def test_folder_batch_does_not_follow_symlinks_out_of_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(DIGITS, folder / "sub" / "real.onnx")
    (folder / "alias.onnx").symlink_to(folder / "sub" / "real.onnx")  # inside the folder: fine
    outside = tmp_path / "elsewhere.onnx"  # a perfectly good model, but not the folder's to give
    shutil.copy(DIGITS, outside)
    (folder / "outside.onnx").symlink_to(outside)
    (folder / "broken.onnx").symlink_to(tmp_path / "missing.onnx")
    (folder / "dir.onnx").mkdir()
    os.mkfifo(folder / "fifo.onnx")  # opening it would block forever
    out = tmp_path / "out"
    code, stdout, _ = _batch(str(folder), "-o", str(out), "--calib", "random:2", "--json")
    assert code == 1
    got = {o["name"]: o for o in json.loads(stdout)}
    assert set(got) == {"alias", "outside", "broken", "dir", "fifo"}, "no entry is skipped silently"
    assert got.pop("alias")["status"] == "converted"
    assert {o["status"] for o in got.values()} == {"failed"}
    assert "outside the input folder" in got["outside"]["reason"] and str(outside) in got["outside"]["reason"]
    assert "broken symbolic link" in got["broken"]["reason"]
    assert "is a directory" in got["dir"]["reason"]
    assert "not a regular file" in got["fifo"]["reason"]
    assert [p.name for p in out.glob("*.onnx")] == ["alias.onnx"]


@pytest.mark.parametrize("via_link", [False, True])
def test_output_folder_may_not_be_the_input_folder(tmp_path: Path, via_link: bool) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DIGITS, folder / "a.onnx")
    out = folder
    if via_link:
        out = tmp_path / "out"
        out.symlink_to(folder)
    code, _, err = _batch(str(folder), "-o", str(out), "--calib", "random:2")
    assert code == 1 and "is the input folder" in err and "choose another -o" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["a.onnx"]


def test_folder_model_whose_name_is_not_a_plain_stem_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DIGITS, folder / "evil\x1b[2J.onnx")  # a terminal escape in the file name
    shutil.copy(DIGITS, folder / "._junk.onnx")  # a hidden file (macOS AppleDouble)
    code, stdout, _ = _batch(str(folder), "-o", str(tmp_path / "out"), "--calib", "random:2", "--json")
    got = {o["name"]: o for o in json.loads(stdout)}
    assert code == 1 and {o["status"] for o in got.values()} == {"failed"}
    assert "control character" in got["evil\x1b[2J"]["reason"] and "rename the file" in got["evil\x1b[2J"]["reason"]
    assert "starts with '.'" in got["._junk"]["reason"]


def test_no_output_may_replace_another_models_input(tmp_path: Path) -> None:
    shutil.copy(DIGITS, tmp_path / "a.onnx")
    shutil.copy(DIGITS, tmp_path / "b.onnx")
    before = (tmp_path / "b.onnx").read_bytes()
    (tmp_path / "m.toml").write_text('[defaults]\ncalib = "random:2"\n'
                                     '[[model]]\npath = "a.onnx"\nname = "b"\n[[model]]\npath = "b.onnx"\nname = "c"\n')
    code, _, err = _batch(str(tmp_path / "m.toml"), "-o", str(tmp_path))
    assert code == 1 and "is the input of model 'c'" in err, err
    assert (tmp_path / "b.onnx").read_bytes() == before


def test_manifest_path_that_is_missing_or_a_folder_is_recorded(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "m.toml").write_text('[[model]]\npath = "missing.onnx"\n[[model]]\npath = "adir"\n')
    code, stdout, _ = _batch(str(tmp_path / "m.toml"), "-o", str(tmp_path / "out"), "--json")
    got = {o["name"]: o for o in json.loads(stdout)}
    assert code == 1
    assert "not found" in got["missing"]["reason"] and "is a directory" in got["adir"]["reason"]


@pytest.mark.parametrize("args", [("-j", "0"), ("-o", str(DIGITS))])
def test_bad_jobs_or_output_file_is_a_usage_error(tmp_path: Path, args: tuple[str, str]) -> None:
    shutil.copy(DIGITS, tmp_path / "a.onnx")
    opts = {"-o": str(tmp_path / "out"), **dict([args])}
    code, _, err = _batch(str(tmp_path), *[x for kv in opts.items() for x in kv])
    assert code == 2 and "Invalid value" in err


def test_calib_size_is_honoured_without_a_preset(tmp_path: Path) -> None:
    shutil.copy(DIGITS, tmp_path / "a.onnx")
    out = tmp_path / "out"
    args = (str(tmp_path), "-o", str(out), "--calib", "random:64", "--json")
    assert json.loads(_batch(*args, "--calib-size", "3")[1])[0]["status"] == "converted"
    again = json.loads(_batch(*args, "--calib-size", "5")[1])[0]
    assert again["status"] == "converted", "another --calib-size is another recipe, not 'up to date'"


def test_a_converted_model_carries_its_calibration_warnings(tmp_path: Path) -> None:
    """A corrupt calibration sample is named in the batch outcome, not only in a quantize run's summary."""
    from test_promises_calibration_data import conv_model, image_batch

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(conv_model(), folder / "m.onnx")
    x = image_batch()
    x[1, 0, 10, 10] = 1e6
    np.savez(tmp_path / "c.npz", x=x)
    code, stdout, _ = _batch(str(folder), "-o", str(tmp_path / "out"), "--calib", str(tmp_path / "c.npz"), "--json")
    (o,) = json.loads(stdout)
    assert code == 0 and o["status"] == "converted", o
    assert any("c.npz[1]" in w and "input 'x'" in w for w in o["warnings"]), o["warnings"]


# ------------------------------------------------------------------------------------------ resume (item 9)
def test_resume_converts_a_damaged_output_again(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DIGITS, folder / "good.onnx")
    out = tmp_path / "out"
    args = (str(folder), "-o", str(out), "--calib", "random:2", "--json")
    assert _batch(*args)[0] == 0
    good = out / "good.onnx"
    intact = good.read_bytes()

    with open(good, "r+b") as f:  # truncate -s 1000
        f.truncate(1000)
    code, stdout, _ = _batch(*args)
    (o,) = json.loads(stdout)
    assert code == 0 and o["status"] == "converted" and "damaged" in o["reason"], o
    assert good.read_bytes() == intact, "the conversion is deterministic: the damage is repaired"

    flipped = bytearray(intact)  # same size, one byte different
    flipped[len(flipped) // 2] ^= 0xFF
    good.write_bytes(bytes(flipped))
    code, stdout, _ = _batch(*args)
    assert json.loads(stdout)[0]["status"] == "converted" and "damaged" in json.loads(stdout)[0]["reason"]
    onnx.checker.check_model(onnx.load(good))

    code, stdout, _ = _batch(*args)
    assert json.loads(stdout)[0]["status"] == "skipped", "an intact output is still trusted"


# ------------------------------------------------------------------------------- signals (items 8 and 10)
def _workers_of(parent: int) -> list[int]:
    """PIDs of live `python -m onnxq.batch --worker` processes whose parent is ``parent`` (a /proc scan)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ...
        if b"onnxq.batch" in cmd and b"--worker" in cmd and int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(pred: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture()
def slow_batch(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """A batch of one model whose calibration takes minutes, started in a subprocess and caught mid-run.

    Yields (the batch process, its worker's pid, OUTDIR); whatever is left of them is killed afterwards.
    """
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DIGITS, folder / "slow.onnx")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CODE_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "onnxq.cli", "batch", str(folder), "-o", str(out), *SLOW_CALIB],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    workers: list[int] = []
    try:
        status = out / ".onnxq-batch" / "slow.status.json"

        def calibrating() -> bool:
            workers[:] = _workers_of(proc.pid)
            try:
                stage = json.loads(status.read_text()).get("stage", "")
            except (OSError, ValueError):
                return False
            return bool(workers) and stage not in ("", "starting", "loading")

        _wait_for(calibrating, 120, "the worker to start converting")
        time.sleep(0.5)
        yield proc, workers[0], out
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopping_the_batch_stops_its_worker(slow_batch: tuple[subprocess.Popen[str], int, Path], signum: int,
                                             code: int) -> None:  # fmt: skip
    proc, worker, out = slow_batch
    writing = out / ".slow.onnx.4242.k3j2h1g0.tmp"  # as if the worker were mid-write when the signal came
    writing.write_bytes(b"half a model")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert not _alive(worker), "the worker was stopped and reaped before the batch exited"
    err = " ".join(stderr.split())
    assert f"batch interrupted by {signal.Signals(signum).name}" in err and "stopped before finishing: 1 (slow)" in err
    time.sleep(1.0)
    assert not (out / "slow.onnx").exists(), "no orphan finishes the model later"
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".onnxq-batch/slow.*.json"))
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary[0]["status"] == "interrupted" and "no output was written" in summary[0]["reason"]


def test_worker_stops_when_the_batch_is_killed_and_next_run_cleans_up(
    slow_batch: tuple[subprocess.Popen[str], int, Path], tmp_path: Path
) -> None:
    proc, worker, out = slow_batch
    proc.kill()  # SIGKILL: no handler runs in the batch process
    proc.wait(timeout=30)
    _wait_for(lambda: not _alive(worker), 15, "the orphaned worker to notice its parent died and exit")
    time.sleep(1.0)
    assert not (out / "slow.onnx").exists()

    state = out / ".onnxq-batch"  # what a worker killed mid-write and a killed batch leave behind
    stale = [out / f".slow.onnx.{os.getpid()}.abcd1234.tmp", out / ".slow.onnx.data.x1y2z3.tmp",
             state / "slow.job.json", state / "slow.status.json", state / ".slow.status.json.q9w8e7.tmp"]  # fmt: skip
    for p in stale:
        p.write_bytes(b"half")
    code, stdout, _ = _batch(str(tmp_path / "models"), "-o", str(out), "--calib", "random:2", "--json")
    assert code == 0 and json.loads(stdout)[0]["status"] == "converted"
    assert [p for p in stale if p.exists()] == []
    assert not list(out.rglob("*.tmp"))


def test_a_second_batch_into_the_same_folder_waits_for_the_first(tmp_path: Path) -> None:
    import fcntl

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "broken.onnx").symlink_to(tmp_path / "missing.onnx")  # refused at once: no worker needed
    state = tmp_path / "out" / ".onnxq-batch"
    state.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CODE_ROOT), os.environ.get("PYTHONPATH", "")])}
    err = tmp_path / "stderr.txt"
    with open(state / "lock", "a+") as held, open(err, "w") as err_file:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another batch" holds OUTDIR
        proc = subprocess.Popen([sys.executable, "-m", "onnxq.cli", "batch", str(folder), "-o", str(tmp_path / "out"), "--json"],
                                stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)  # fmt: skip
        try:
            _wait_for(lambda: "waiting for it to finish" in err.read_text() or proc.poll() is not None, 120,
                      "the second batch to say it waits")  # fmt: skip
            time.sleep(0.5)
            assert proc.poll() is None and not (tmp_path / "out" / "batch-summary.json").exists(), "it waits"
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
        stdout, _ = proc.communicate(timeout=60)
    assert "is writing into" in err.read_text()
    assert proc.returncode == 1 and json.loads(stdout)[0]["status"] == "failed"
