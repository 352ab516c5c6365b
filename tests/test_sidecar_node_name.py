"""A sidecar's node name names its default spill journal folder: it must be one folder name.

Found in review: ``wattwise sample --node ../../escaped`` put the default journal at
``$WATTWISE_JOURNAL/../../escaped``, outside the journal directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from profiler.errors import BadInputError
from profiler.sidecar import Sidecar
from profiler.sources.replay import ReplaySource
from tests.test_sidecar import trace


@pytest.mark.parametrize("node", ["../../escaped", "a/b", "..", "."])
def test_a_node_name_that_is_not_one_folder_name_is_refused(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATTWISE_JOURNAL", str(tmp_path / "journal"))
    with pytest.raises(BadInputError, match="node name must be one folder name"):
        Sidecar([ReplaySource(trace())], node=node, receiver=lambda batch: None)
    assert not (tmp_path / "escaped").exists()


def test_an_explicit_journal_takes_any_node_name(tmp_path: Path) -> None:
    side = Sidecar(
        [ReplaySource(trace())],
        node="rack/1",
        receiver=lambda batch: None,
        journal=tmp_path / "j",
    )
    assert side.node == "rack/1"


def test_sample_refuses_such_a_node_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WATTWISE_JOURNAL", str(tmp_path / "journal"))
    argv = ["sample", "--source", "modelled", "--duration", "0.3", "--node", "../../escaped"]
    assert main([*argv, "--store", str(tmp_path / "store")]) == 2
    assert "node name must be one folder name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists()
