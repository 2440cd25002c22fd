"""The catalog: which runs a store holds and which of them are complete, in two record logs.

``catalog/runs`` holds the :class:`~raydiff.records.RunRecord` of every run (appended when
it starts), ``catalog/commits`` the :class:`~raydiff.records.CommitRecord` of every
complete run (appended once its results are whole). They are what the ``runs`` view reads,
and how a query finds the files of the runs it names without listing ``runs/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from raydiff.records import CommitRecord, RunRecord, from_table
from raydiff.store import layout
from raydiff.store.files import Files
from raydiff.store.log import RecordLog


@dataclass(frozen=True)
class Snapshot:
    """The catalog as read once: run records and commit records (one per run id)."""

    runs: pa.Table
    commits: pa.Table

    @property
    def complete(self) -> set[str]:
        """Ids of the complete runs."""
        return set(self.commits.column("run_id").to_pylist())

    @property
    def run_ids(self) -> list[str]:
        """Ids of every run, complete or not."""
        return self.runs.column("run_id").to_pylist()

    def latest_by_name(self) -> dict[str, str]:
        """Run name → id of the most recently completed run of that name (how a name
        stands for a run in queries and commands)."""
        names = dict(zip(self.runs.column("run_id").to_pylist(), self.runs.column("name").to_pylist()))
        latest: dict[str, tuple[object, str]] = {}
        for run_id, done in zip(self.commits.column("run_id").to_pylist(),
                                self.commits.column("completed_at").to_pylist()):
            name = names.get(run_id)
            if name is not None and (name not in latest or latest[name][0] < done):
                latest[name] = (done, run_id)
        return {name: run_id for name, (_, run_id) in latest.items()}

    def run(self, run_id: str) -> RunRecord | None:
        rows = from_table(self.runs.filter(pa.compute.equal(self.runs.column("run_id"), run_id)), RunRecord)
        return rows[0] if rows else None


class Catalog:
    """The two logs of a store's catalog."""

    def __init__(self, files: Files) -> None:
        self.runs = RecordLog(files, layout.CATALOG_RUNS, RunRecord, key="run_id", order="created_at")
        self.commits = RecordLog(files, layout.CATALOG_COMMITS, CommitRecord, key="run_id", order="completed_at")

    def read(self) -> Snapshot:
        # commits first: a run committed between the two reads then shows as incomplete, never
        # as complete without its run record
        commits = self.commits.read()
        return Snapshot(self.runs.read(), commits)

    def add_run(self, run: RunRecord) -> None:
        self.runs.append([run])
        self.runs.fold()

    def add_commit(self, commit: CommitRecord) -> None:
        self.commits.append([commit])
        self.commits.fold()
