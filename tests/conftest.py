"""Shared fixtures: the real test files in ../shared/data and small synthetic slides."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HDMIL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests run the encoder as exact torch fp32 (no start-up probe whose choice would depend on the
# machine's load) and never write the compute cache into the user's home.
os.environ.setdefault("HDMIL_COMPUTE", "exact")
os.environ.setdefault("HDMIL_CACHE", str(Path(tempfile.mkdtemp(prefix="hdmil-test-cache-"))))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def cmu_slide(shared_data) -> Path:
    return _need(shared_data / "slides" / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def broken_slide(shared_data) -> Path:
    return _need(shared_data / "slides" / "broken.svs")


@pytest.fixture(scope="session")
def tiny_slide(shared_data) -> Path:
    return _need(shared_data / "slides" / "small-16px.svs")


@pytest.fixture(scope="session")
def tiles_dir(shared_data) -> Path:
    return _need(shared_data / "tiles")


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 4096 x 3072 px synthetic H&E slide at 0.5 µm/px with a tumour area (made once per run)."""
    from hdmil.synth import synth_slide

    out = tmp_path_factory.mktemp("synth") / "synthetic.tiff"
    synth_slide(out, size=(4096, 3072), seed=7, tumor_fraction=0.2)
    return out


@pytest.fixture
def errors():
    """Error notifications shown from now on (their messages)."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    start = len(notification_manager.records)

    def get() -> list[str]:
        return [
            str(n.message) for n in notification_manager.records[start:]
            if n.severity == NotificationSeverity.ERROR
        ]  # fmt: skip

    return get
