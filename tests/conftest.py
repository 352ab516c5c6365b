"""Fixtures shared by every test: an isolated store, clean environment, the shared real data."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "seaa2023"
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    """A UTC timestamp ``seconds`` after 2024-01-01 00:00:00 UTC."""
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test gets its own store and no inherited cluster or GPU settings."""
    monkeypatch.setenv("WATTWISE_STORE", str(tmp_path / "store"))
    for name in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def shared_data() -> Path:
    """The real SEAA 2023 traces in ../shared, or a skip saying why."""
    if not (SHARED_DATA / "runs.parquet").is_file():
        pytest.skip(f"real traces not found at {SHARED_DATA} (../shared/data/seaa2023)")
    return SHARED_DATA
