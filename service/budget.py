"""Refusing, before it is logged, an update that can never fit its table's budget.

A table under a dimension policy must hold its rows within ``budget_bytes``; the policy can
shrink every row down to the table's smallest class, no further.  So when the rows the table
would hold after an update, all at the smallest class, plus what the table holds besides rows
(index, rotation, metadata: their size now, a lower bound of their size then) exceed the
budget, no re-decision can ever fit them.  Such an update is answered 422 and never reaches the
log: once logged it would have to be applied, and the table would sit over its budget.

This is the check that can be made up front; it cannot see entries already in the log and not
yet applied, nor entries a trainer writes straight into the stream.  Those are applied, and a
table the policy cannot fit is marked over budget instead (``HostedTable.over_budget``), which
stalls nothing else.  An update that does not add rows on balance is always taken: deletes are
how a table over its budget gets back under it.
"""

from __future__ import annotations

import numpy as np
import torch

from .registry import HostedTable


def refusal(hosted: HostedTable, upsert_ids: np.ndarray, delete_ids: np.ndarray) -> str | None:
    """Why this update cannot fit the table's budget, or None when it can (or the table has no
    policy enforcing one)."""
    if hosted.policy is None or hosted.budget_bytes is None or upsert_ids.shape[0] == 0:
        return None
    table = hosted.table
    upserts = np.unique(upsert_ids)
    deletes = np.unique(delete_ids)
    with table.lock:  # one consistent view: rows, index and the IDs present
        live = sum(table.rows_per_class())
        fixed = table.nbytes - sum(int(s.numel()) for s in table.slabs)
        probe = torch.from_numpy(np.concatenate([upserts, deletes])).to(table.device)
        present = (table.index.resolve(probe) >= 0).cpu().numpy()
    added = int((~present[: upserts.shape[0]] & ~np.isin(upserts, deletes)).sum())
    removed = int(present[upserts.shape[0] :].sum())
    rows_after = live + added - removed
    if rows_after <= live:
        return None
    smallest = min(table.classes, key=lambda rc: rc.row_bytes)
    need = fixed + rows_after * smallest.row_bytes
    if need <= hosted.budget_bytes:
        return None
    return (
        f"table {hosted.name!r} would hold {rows_after} rows: even all in its smallest class "
        f"({smallest.label()}, {smallest.row_bytes} bytes a row) they need {need} bytes with the index, "
        f"over its budget of {hosted.budget_bytes} bytes; raise the budget (PUT /v1/admin/tables/{hosted.name}/policy), "
        "add a smaller class, or delete rows"
    )
