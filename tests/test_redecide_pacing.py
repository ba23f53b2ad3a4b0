"""Segment re-decisions are paced: after one that took t seconds the next waits t * (1/share - 1),
so a fast stream into a large table keeps its applier applying (a re-decision is O(held IDs)).
Driven on an applier whose thread is not started, with its clock read from the table's own
record of the last re-decision (no sleeps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compression import CompressedTable, RowClass
from service.applier import Applier
from service.metrics import ServiceMetrics
from service.registry import HostedTable, TableRegistry, policy_from_config
from service.settings import Settings
from service.updatelog.sqlite_log import SqliteUpdateLog


def _applier(tmp_path: Path, share: float) -> tuple[Applier, HostedTable, ServiceMetrics]:
    settings = Settings(tables_dir=tmp_path / "tables", segment_updates=10, segment_seconds=3600, snapshot_interval_s=3600,
                        redecide_max_share=share)
    registry = TableRegistry()
    table = CompressedTable.empty(8, [RowClass(8, 32), RowClass(8, 8)], keyed=True)
    ids = torch.arange(200)
    table.put(ids, torch.randn(200, 8, generator=torch.Generator().manual_seed(1)), 0)
    hosted = registry.add("t", table)
    hosted.policy = policy_from_config({"name": "knapsack"})
    hosted.budget_bytes = table.nbytes * 4  # fits: only segments trigger re-decisions
    metrics = ServiceMetrics(registry)
    return Applier(SqliteUpdateLog(tmp_path / "log.sqlite3"), registry, metrics, settings), hosted, metrics


def _decisions(metrics: ServiceMetrics) -> float:
    return metrics.resize_events.labels("t")._value.get()  # noqa: SLF001 - the counter's own value


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_a_full_segment_waits_for_its_share_after_a_long_redecision(tmp_path: Path, share: float) -> None:
    applier, hosted, metrics = _applier(tmp_path, share)
    hosted.updates_since_decision = 10  # a full segment
    applier._maybe_redecide()  # noqa: SLF001 - the applier loop's own step
    assert _decisions(metrics) == 1 and hosted.updates_since_decision == 0
    # pretend that one took 10 s: the next segment has to wait 10 * (1/share - 1) s after it ended
    wait = 10.0 * (1.0 / share - 1.0)
    hosted.last_decision_seconds = 10.0
    hosted.updates_since_decision = 10_000
    hosted.last_decision_at -= wait - 1.0  # ended (wait - 1) s ago: still inside the wait
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 1 and hosted.updates_since_decision == 10_000  # paced: rows wait for the next one
    hosted.last_decision_at -= 2.0  # now (wait + 1) s ago
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 2 and hosted.updates_since_decision == 0
    assert 0.0 <= hosted.last_decision_seconds < 10.0  # the real duration replaced the pretend one


def test_an_over_budget_table_is_not_paced(tmp_path: Path) -> None:
    applier, hosted, metrics = _applier(tmp_path, 0.25)
    hosted.last_decision_seconds = 100.0  # a long last re-decision, just now
    hosted.updates_since_decision = 10
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 0  # a segment waits ...
    hosted.budget_bytes = hosted.table.nbytes - 1  # ... a table over its budget does not
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 1


def test_share_one_means_no_pacing(tmp_path: Path) -> None:
    applier, hosted, metrics = _applier(tmp_path, 1.0)
    hosted.last_decision_seconds = 100.0
    hosted.updates_since_decision = 10
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 1


def test_the_share_must_be_in_0_1() -> None:
    with pytest.raises(ValueError):
        Settings(redecide_max_share=0)
    with pytest.raises(ValueError):
        Settings(redecide_max_share=1.5)
