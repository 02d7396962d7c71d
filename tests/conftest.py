"""Shared test fixtures.

Real-model tests are marked ``@pytest.mark.assets`` and use the ``assets`` fixture, which finds the
shared assets through ``ONNXQ_ASSETS`` (default ``../shared/assets`` from the repository root). When the
folder is absent they skip with a reason, unless ``ONNXQ_REQUIRE_ASSETS=1`` (set by ``.ci/run``) makes
that a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_root() -> Path:
    """Where the shared real assets live."""
    return Path(os.environ.get("ONNXQ_ASSETS", REPO_ROOT.parent / "shared" / "assets")).resolve()


@pytest.fixture(scope="session")
def assets() -> Path:
    """The assets folder; skips (or fails under ONNXQ_REQUIRE_ASSETS=1) when it is missing."""
    root = assets_root()
    if not (root / "README.md").is_file():
        msg = f"real assets not found at {root} (set ONNXQ_ASSETS to the shared/assets folder)"
        if os.environ.get("ONNXQ_REQUIRE_ASSETS") == "1":
            pytest.fail(msg + "; ONNXQ_REQUIRE_ASSETS=1 makes this a failure")
        pytest.skip(msg)
    return root


def asset(assets_dir: Path, rel: str) -> Path:
    """One asset file; fails or skips like the ``assets`` fixture when that file is missing."""
    p = assets_dir / rel
    if not p.exists():
        msg = f"asset {rel} not found under {assets_dir}"
        if os.environ.get("ONNXQ_REQUIRE_ASSETS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return p
