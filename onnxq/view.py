"""``onnxq view``: open a model in Netron, served from this machine, and print the address.

Looking at the graph is the quickest way to see what a quantization run did (where the
QuantizeLinear/DequantizeLinear pairs went, which nodes stayed float). Netron's Python package
(``pip install "onnxq[view]"``) serves its web app and one model file over HTTP from a background
thread; this module wraps it so that the CLI and library users get onnxq's behaviour:

* the model is loaded and validated first, as every onnxq command loads models (exists, is a file,
  parses as ONNX, passes the checks of :func:`onnxq.model.load_model`), and every failure is one
  :class:`~onnxq.errors.OnnxqError` line that names the file or port and the fix;
* netron is imported only when a model is viewed, so it stays an optional extra;
* no browser opens unless asked (``browse=True``): the address is returned and printed instead, which
  also works over SSH with a forwarded port;
* :func:`wait` blocks until Ctrl-C and then stops the server; :func:`stop` stops one and waits for its
  thread to end, so nothing keeps listening after the command returns.

Ports: ``None`` lets netron choose (8080, else 8081, else a free one), so the usual address is stable;
``0`` asks for any free port; any other number is used or refused with a clear error.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import urllib.parse
from pathlib import Path
from types import ModuleType
from typing import Callable

from onnxq.errors import MissingDependencyError, OnnxqError
from onnxq.text import printable

__all__ = ["serve", "wait", "stop", "view_model"]

_INSTALL_HINT = 'netron is not installed: pip install "onnxq[view]"'
_STOP_TIMEOUT_S = 5.0


def _netron() -> ModuleType:
    """Import netron lazily; a missing package is one line naming the extra to install."""
    try:
        return importlib.import_module("netron")
    except ImportError as exc:
        raise MissingDependencyError(_INSTALL_HINT) from exc


def _check_model(model: str | os.PathLike[str]) -> Path:
    """The model as an absolute path, after loading it as ONNX with :func:`onnxq.model.load_model`'s checks.

    Netron would serve any file (a text file, a truncated download) and show an error in the browser;
    refusing it here gives the one-line reason in the terminal before a server starts. External data is
    not read (only checked to stay inside the model's folder), so a large model is validated quickly.
    Models onnxq could not quantize (custom ops, a newer opset) are still shown.
    """
    from onnxq.model import load_model

    path = Path(os.path.abspath(model))
    load_model(path, load_external_data=False, runnable=False)
    return path


def _split(address: str) -> tuple[str, int]:
    """``"http://HOST:PORT"`` back into netron's ``(host, port)`` tuple."""
    parts = urllib.parse.urlsplit(address)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"not a netron address: {address!r} (expected http://HOST:PORT)")
    return parts.hostname, parts.port


def serve(model: str | os.PathLike[str], *, port: int | None = None, host: str = "localhost",
          browse: bool = False) -> str:
    """Start serving MODEL in Netron on (host, port) from a background thread; return its address.

    Args:
        model: The ONNX model file (``.onnx``, or any file that parses as an ONNX ModelProto).
            External-data files next to it are served too.
        port: ``None``: netron's choice (8080, else 8081, else a free port); ``0``: any free port;
            otherwise that port (a netron server this process already runs there is replaced).
        host: The interface to listen on; ``"localhost"`` keeps the model private to this machine.
        browse: Also open the address in the default web browser.

    Returns:
        The address, ``"http://HOST:PORT"`` (``"http://localhost:8080"`` by default). The server runs
        until :func:`stop` or :func:`wait` ends it, or the process exits.

    Raises:
        ModelLoadError: The model is missing, a directory, empty, not ONNX or invalid (the message names it).
        MissingDependencyError: netron is not installed.
        OnnxqError: The port is out of range, in use, or the host cannot be bound.
    """
    path = _check_model(model)
    if port is not None and not 0 <= port <= 65535:
        raise OnnxqError(f"port {port} is out of range; use 1-65535, or omit --port to let onnxq pick one")
    netron = _netron()
    root = logging.getLogger()
    # netron.serve calls logging.basicConfig(level=INFO) when the root logger has no handler, which would
    # reconfigure the caller's logging; a temporary NullHandler keeps its INFO lines in netron's logger
    guard = None if root.hasHandlers() else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        bound = netron.serve(str(path), None, address=(host, port), browse=browse)
    except OSError as exc:
        where = f"port {port} on {host}" if port else f"a port on {host}"
        reason = exc.strerror or str(exc)
        fix = "pick another with --port, or omit it" if port else "check --host"
        raise OnnxqError(f"netron cannot serve {path} at {where}: {reason}; {fix}") from None
    except ValueError as exc:  # netron: "Invalid address." / "Failed to allocate port."
        raise OnnxqError(f"netron cannot serve {path} on {host}: {exc}; check --host and --port") from None
    finally:
        if guard is not None:
            root.removeHandler(guard)
    return f"http://{bound[0]}:{bound[1]}"


def stop(address: str) -> None:
    """Stop the netron server at ADDRESS (from :func:`serve`) and wait for its thread to end.

    Stopping a server that is not running does nothing.
    """
    netron = _netron()
    host, port = _split(address)
    netron.stop((host, port))
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for thread in threading.enumerate():
        # netron.server._HTTPServerThread records its (host, port) as .address
        if type(thread).__module__.startswith("netron") and getattr(thread, "address", None) == (host, port):
            thread.join(max(0.0, deadline - time.monotonic()))


def wait(address: str, *, poll_s: float = 0.1) -> None:
    """Block until Ctrl-C (or until the server at ADDRESS stops), then stop it and return.

    Ctrl-C is the normal way to end ``onnxq view``, so it is absorbed here, not re-raised.
    """
    netron = _netron()
    host, port = _split(address)
    try:
        while netron.status((host, port)):
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        stop(address)


def view_model(model: str | os.PathLike[str], port: int | None = None, browse: bool = False,
               echo: Callable[[str], object] = print, *, host: str = "localhost", block: bool = True) -> str:
    """What ``onnxq view`` does: serve MODEL, echo the address, then wait for Ctrl-C.

    Args:
        model, port, host, browse: As for :func:`serve`.
        echo: Receives the one line to show the user, ``"Netron is serving MODEL at ADDRESS (Ctrl-C to stop)"``.
        block: Wait for Ctrl-C and stop the server (the CLI). False returns at once with the server still
            running; the caller stops it with :func:`stop`.

    Returns:
        The address the model was served at.
    """
    address = serve(model, port=port, host=host, browse=browse)
    try:
        echo(f"Netron is serving {printable(model)} at {address} (Ctrl-C to stop)")
    except BaseException:
        stop(address)
        raise
    if block:
        wait(address)
    return address
