"""Edges of ``wattwise recommend`` on the command line: its table outside a terminal."""

from __future__ import annotations

import json
import re

import pytest

from cluster.cli import main

#: Long node type names and every column filled: wider than rich's 80-column fallback.
INVENTORY = [
    {"name": "gtx-750-ti-spot-pool-eu-west", "gpu_model": "GTX 750 Ti", "default": True},
    {"name": "rtx-3070-on-demand-pool-eu-west", "gpu_model": "RTX 3070"},
    {"name": "rtx-3090-reserved-pool-eu-west", "gpu_model": "RTX 3090"},
]
for _i, _n in enumerate(INVENTORY):
    _n.update(price_per_hour=0.25 * (_i + 1), carbon_g_per_kwh=123.0 + _i)


@pytest.fixture(scope="module")
def recommend_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``wattwise recommend`` arguments with a small PRE model and the inventory above."""
    from estimators.pre import PREModel
    from tests.test_pre import SMALL, synthetic

    d = tmp_path_factory.mktemp("pre_cli")
    model = d / "pre-v1.json"
    PREModel(**SMALL).fit(synthetic(4, 5, sigma=0.02, seed=5)).save(model, card={"version": 1})
    inv = d / "inv.json"
    inv.write_text(json.dumps(INVENTORY))
    # arch0's FLOPs are the synthetic runs' own; the job needs numbers, not a torchvision model
    job = ["--arch", "arch0", "--batch-size", "32", "--train-size", "20000"]
    job += ["--gflops", "5", "--layers", "50", "--epochs", "10"]
    return ["recommend", *job, "--model", str(model), "--inventory", str(inv)]


def _cells(row: dict[str, object], rows: list[dict[str, object]]) -> list[str]:
    """The table's cells for one JSON row of ``rows``, as the table formats them."""
    from cluster.commands.pre_cmds import ENERGY_UNITS, TIME_UNITS, column_unit, money, sig

    energies = [r[k] for r in rows for k in ("total_energy_kwh", "total_upper_kwh")]
    _, e = column_unit(energies, ENERGY_UNITS)  # type: ignore[arg-type]
    _, h = column_unit([r["total_time_h"] for r in rows], TIME_UNITS)  # type: ignore[misc]
    lo, hi = row["total_lower_kwh"], row["total_upper_kwh"]
    return [
        str(row["node_type"]),
        f"{row['gpu_count']}x {row['gpu_model']}",
        sig(row["total_energy_kwh"] * e),  # type: ignore[operator]
        f"{sig(lo * e)}-{sig(hi * e)}",  # type: ignore[operator]
        sig(row["total_time_h"] * h),  # type: ignore[operator]
        money(row["cost"]),  # type: ignore[arg-type]
        sig(row["carbon_g"]),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("columns", [None, "40"])
def test_recommend_table_outside_a_terminal_keeps_every_number_and_name(
    columns: str | None,
    recommend_args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert main([*recommend_args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["node_types"]
    assert main(recommend_args) == 0
    table = capsys.readouterr().out
    assert "…" not in table
    lines = table.splitlines()
    for row in rows:
        cells = _cells(row, rows)
        # each row of the JSON is one line of the table, every cell whole
        matching = [ln for ln in lines if all(f" {c} " in ln for c in cells)]
        assert len(matching) == 1, (cells, table)
    assert f"choose {rows[0]['node_type']}:" in table


def test_recommend_table_in_a_narrow_terminal_folds_instead_of_cutting(
    recommend_args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "60")
    assert main([*recommend_args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["node_types"]
    assert main(recommend_args) == 0
    table = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "…" not in table
    assert max(len(ln) for ln in table.splitlines()) <= 60
    # folded or wrapped, every cell reads whole from top to bottom of its column
    cols = _columns(table)
    for row in rows:
        for c in _cells(row, rows):
            assert any(c.replace(" ", "") in col for col in cols), (c, table)


def _columns(table: str) -> list[str]:
    """Each column of a rich table's body, its pieces joined top to bottom without spaces."""
    lines = [ln.split("│")[1:-1] for ln in table.splitlines() if ln.startswith("│")]
    return ["".join(re.sub(r"\s", "", ln[i]) for ln in lines) for i in range(len(lines[0]))]


def test_a_small_jobs_table_shows_its_numbers_not_zeros(
    recommend_args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: kWh, hours and cost had fixed decimals, so a small job read 0.000 kWh
    and 0.00 h on every row while the summary said "saves 43.9 %"."""
    monkeypatch.delenv("COLUMNS", raising=False)
    small = [a if a != "20000" else "20" for a in recommend_args]
    small[small.index("--epochs") + 1] = "1"
    assert main([*small, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["node_types"]
    assert max(r["total_upper_kwh"] for r in rows) < 1e-5  # below 1 Wh: a small job
    assert main(small) == 0
    table = capsys.readouterr().out
    header = " ".join(table.split())
    assert "energy J" in header and "interval J" in header and "time s" in header
    body = [ln for ln in table.splitlines() if ln.startswith("│")]
    assert len(body) == len(rows)
    for line, row in zip(body, rows, strict=True):
        cells = [c.strip() for c in line.split("│")[1:-1]]
        assert cells[0] == str(row["rank"])
        # 3 significant figures of each figure in the column's unit (J, s), never zero
        assert float(cells[3]) == pytest.approx(row["total_energy_kwh"] * 3.6e6, rel=5e-3)
        lo, hi = (float(v) for v in cells[4].split("-"))
        assert lo == pytest.approx(row["total_lower_kwh"] * 3.6e6, rel=5e-3)
        assert hi == pytest.approx(row["total_upper_kwh"] * 3.6e6, rel=5e-3)
        assert float(cells[5]) == pytest.approx(row["total_time_h"] * 3600, rel=5e-3)
        assert float(cells[6]) == pytest.approx(row["cost"], rel=5e-3) and row["cost"] > 0
        assert float(cells[7]) == pytest.approx(row["carbon_g"], rel=5e-3)
    assert len({c.split("│")[4] for c in body}) == len(rows)  # the rows tell apart
