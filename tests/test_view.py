"""onnxq.view: serving a model in Netron (the ``onnxq view`` command's library side).

Servers are started on port 0 (any free port) so that tests never collide with a real netron on 8080;
every test leaves no netron server thread running, and none opens a web browser.
"""

from __future__ import annotations

import _thread
import re
import socket
import signal
import sys
import threading
import urllib.request
import webbrowser
from pathlib import Path

import onnx
import onnx.helper as oh
import pytest

from onnxq.errors import MissingDependencyError, ModelLoadError, OnnxqError
from onnxq.view import serve, stop, view_model, wait

ADDRESS = re.compile(r"^http://localhost:(\d+)$")


def _netron_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__module__.startswith("netron") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_browser_no_leftover_servers(monkeypatch: pytest.MonkeyPatch):
    """Fail on any attempt to open a browser; after each test, no netron server thread may be left."""

    def refuse(*args: object, **kwargs: object) -> bool:
        raise AssertionError(f"a test tried to open a web browser: {args}")

    monkeypatch.setattr(webbrowser, "open", refuse)
    yield
    left = _netron_threads()
    for t in left:  # clean up before failing, so one leak does not cascade into the next tests
        stop(t.url)  # type: ignore[attr-defined]
    assert not left, f"netron server threads left running: {[t.url for t in left]}"  # type: ignore[attr-defined]


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"], name="relu")], "tiny", [x], [y])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def netron():
    return pytest.importorskip("netron")


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - a local test server
        return r.status, r.headers.get("Content-Type", ""), r.read()


def test_serve_returns_address_and_serves_the_model(tiny_model: Path, netron) -> None:
    address = serve(tiny_model, port=0)
    try:
        m = ADDRESS.match(address)
        assert m, address
        assert int(m.group(1)) > 0
        assert netron.status(("localhost", int(m.group(1))))
        status, ctype, body = _get(address)
        assert status == 200
        assert ctype.startswith("text/html")
        html = body.decode("utf-8")
        assert "<html" in html.lower()
        assert '<meta name="file" content="/data/tiny.onnx">' in html  # netron's page loads this model
        assert _get(address + "/data/tiny.onnx")[2] == tiny_model.read_bytes()
    finally:
        stop(address)
    assert not netron.status(("localhost", int(m.group(1))))
    assert not _netron_threads()


def test_serve_accepts_an_onnx_protobuf_without_the_suffix(tiny_model: Path, netron) -> None:
    pb = tiny_model.with_name("model.pb")
    pb.write_bytes(tiny_model.read_bytes())
    address = serve(pb, port=0)
    try:
        assert '<meta name="file" content="/data/model.pb">' in _get(address)[2].decode("utf-8")
    finally:
        stop(address)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.onnx"
    with pytest.raises(OnnxqError, match="model file not found") as exc:
        serve(missing)
    assert str(missing) in str(exc.value)
    assert isinstance(exc.value, ModelLoadError)


@pytest.mark.parametrize("kind", ["directory", "empty", "not-onnx"])
def test_bad_model_paths_are_refused_with_the_path(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path, why = tmp_path, "is a directory"
    elif kind == "empty":
        path, why = tmp_path / "empty.onnx", "is empty"
        path.write_bytes(b"")
    else:
        path, why = tmp_path / "notes.txt", "is not an ONNX model"
        path.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match=why) as exc:
        serve(path, port=0)
    assert str(path) in str(exc.value)


def test_netron_missing_names_the_extra(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "netron", None)  # makes `import netron` fail
    with pytest.raises(OnnxqError) as exc:
        serve(tiny_model, port=0)
    assert isinstance(exc.value, MissingDependencyError)
    assert 'pip install "onnxq[view]"' in str(exc.value)
    assert str(exc.value) == 'netron is not installed: pip install "onnxq[view]"'


def test_port_in_use_is_a_clear_error(tiny_model: Path, netron) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OnnxqError, match=f"port {port} on localhost") as exc:
            serve(tiny_model, port=port)
    assert "--port" in str(exc.value)


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_out_of_range(tiny_model: Path, port: int) -> None:
    with pytest.raises(OnnxqError, match=f"port {port} is out of range"):
        serve(tiny_model, port=port)


def test_explicit_port_is_used(tiny_model: Path, netron) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = serve(tiny_model, port=port)
    try:
        assert address == f"http://localhost:{port}"
        assert _get(address)[0] == 200
    finally:
        stop(address)


def test_browse_opens_the_address(tiny_model: Path, netron, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    address = serve(tiny_model, port=0, browse=True)
    stop(address)
    assert opened == [address]


def test_view_model_echoes_the_address(tiny_model: Path, netron) -> None:
    lines: list[str] = []
    address = view_model(tiny_model, port=0, browse=False, echo=lines.append, block=False)
    try:
        assert ADDRESS.match(address)
        assert lines == [f"Netron is serving {tiny_model} at {address} (Ctrl-C to stop)"]
        assert _get(address)[0] == 200
    finally:
        stop(address)


def test_view_model_blocks_until_ctrl_c_then_stops(tiny_model: Path, netron) -> None:
    lines: list[str] = []
    # Ctrl-C arrives as KeyboardInterrupt in the main thread; view_model absorbs it and stops the server.
    # interrupt_main() is ignored when SIGINT is not handled by Python (an earlier test or library may have set
    # SIG_DFL / SIG_IGN: in a full CI run this test hung), so Python's handler is installed for the test.
    # The timer starts once the address is echoed (the server is up); a failsafe stops the server after 20 s so
    # that a lost interrupt fails the test instead of hanging the run.
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    failsafe: list[threading.Timer] = []
    fired: list[bool] = []

    def give_up(address: str) -> None:
        fired.append(True)
        stop(address)

    def echo(line: str) -> None:
        lines.append(line)
        failsafe.append(threading.Timer(20.0, give_up, args=(line.split(" at ")[1].split(" ")[0],)))
        failsafe[0].start()
        timer.start()

    try:
        address = view_model(tiny_model, port=0, echo=echo)
    finally:
        timer.cancel()
        for t in failsafe:
            t.cancel()
        signal.signal(signal.SIGINT, old_handler)
    assert failsafe and not fired, "the Ctrl-C never reached view_model; the failsafe stopped the server"
    assert lines and address in lines[0]
    assert not netron.status(("localhost", int(ADDRESS.match(address).group(1))))


def test_wait_returns_when_the_server_is_stopped_elsewhere(tiny_model: Path, netron) -> None:
    """wait() blocks while the server runs and returns once another thread stops it. It runs in a daemon
    thread with a deadline, so a wait() that never returns fails the test instead of hanging the run."""
    address = serve(tiny_model, port=0)
    port = int(ADDRESS.match(address).group(1))  # type: ignore[union-attr]
    waiter = threading.Thread(target=wait, args=(address,), kwargs={"poll_s": 0.05}, daemon=True)
    try:
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive(), "wait() returned while the server was still running"
        stop(address)
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "wait() did not return within 10 s of the server being stopped"
    finally:
        stop(address)
        waiter.join(timeout=10)
    assert not netron.status(("localhost", port))


def test_cli_view_missing_model_one_line_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnxq.cli import main

    r = CliRunner().invoke(main, ["view", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 1 and "nope.onnx" in r.stderr and "Traceback" not in r.stderr
    assert "Netron" in CliRunner().invoke(main, ["view", "--help"]).stdout
