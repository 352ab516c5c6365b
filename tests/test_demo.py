"""``wattwise demo`` on the real traces: the README's main command."""

from __future__ import annotations

import re

from cluster.cli import main


def test_demo_imports_checks_and_ranks(shared_data, tmp_path, capsys):
    store = tmp_path / "demo-store"
    assert main(["demo", "--data", str(shared_data), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "249 runs, 600,070 samples" in out
    # The three raw CSVs agree with the dataset's own energy within 1 %.
    diffs = [float(d) for d in re.findall(r"([+-]\d+\.\d+) %", out)]
    assert len(diffs) == 3 and all(abs(d) < 1.0 for d in diffs)
    assert "saving vs worst" in out
    # A second run changes nothing in the store.
    assert main(["demo", "--data", str(shared_data), "--store", str(store)]) == 0
    assert "(0 new)" in capsys.readouterr().out


def test_demo_without_data_says_where_to_get_it(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nothing"), "--store", str(tmp_path)]) == 2
    assert "The real traces are not at" in capsys.readouterr().out
