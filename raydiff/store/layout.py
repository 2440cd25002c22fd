"""Where every file of a store lives: the one description of the layout (store layout 2).

Paths are relative to the store root (a local directory or an object-store URI)::

    raydiff-store.json                        {"layout": 2}: written with the first run
    catalog/runs/<entry>.parquet              RunRecord of each run, one file per start
    catalog/commits/<entry>.parquet           CommitRecord of each complete run
    runs/<run_id>/run.parquet                 RunRecord, written when the run starts
    runs/<run_id>/plan.parquet                PlanRecord per tensor name
    runs/<run_id>/units/u00000042.parquet     UnitRecord of one unit, while the run is incomplete
    runs/<run_id>/spectra/s00000007.parquet   SpectrumRecord of one matrix, likewise
                                              (s00000007-e00003.parquet: expert 3 of a stack)
    runs/<run_id>/hashes/h00000007.parquet    HashRecord of one tensor (`--hash`), likewise
    runs/<run_id>/units.parquet               every UnitRecord of a complete run (masks included),
                                              one row group per tensor, written at commit
    runs/<run_id>/spectra.parquet             every SpectrumRecord of a complete run
    runs/<run_id>/tensors.parquet             TensorRecord per tensor, written at commit
    runs/<run_id>/commit.parquet              CommitRecord: the run is complete once it exists
    watch/events/<entry>.parquet              WatchEventRecords of ``raydiff watch``
    chains/<entry>.parquet                    ChainStepRecords: which runs make up each chain's steps

A catalog, event or chain folder is a :class:`~raydiff.store.log.RecordLog`: entries of a few
records each (``e-<time>-<id>.parquet``), folded now and then into snapshots
(``s-<time>-<id>.parquet``), so reading one costs a listing and a few files however many
runs the store holds. A query reads the catalog and then only the files of the runs it
names.
"""

from __future__ import annotations

import re

from raydiff.errors import StoreError

#: The layout this release writes; older stores are converted by ``raydiff store upgrade``.
LAYOUT = 2
LAYOUT_FILE = "raydiff-store.json"
RUNS = "runs"
CATALOG_RUNS = "catalog/runs"
CATALOG_COMMITS = "catalog/commits"
WATCH_EVENTS = "watch/events"
CHAINS = "chains"

RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")
UNIT_FILE = re.compile(r"^u(\d{8,})\.parquet$")
SPECTRUM_FILE = re.compile(r"^s(\d{8,})(?:-e(\d{5,}))?\.parquet$")
HASH_FILE = re.compile(r"^h(\d{8,})\.parquet$")


def run_dir(run_id: str) -> str:
    """``runs/<run_id>``, for a run id that is a hex digest (never a path from elsewhere).

    Raises:
        StoreError: not a run id.
    """
    if not RUN_ID.match(run_id):
        raise StoreError(f"{run_id!r} is not a run id (hex digest)")
    return f"{RUNS}/{run_id}"


def run_file(run_id: str) -> str:
    return f"{run_dir(run_id)}/run.parquet"


def plan_file(run_id: str) -> str:
    return f"{run_dir(run_id)}/plan.parquet"


def units_dir(run_id: str) -> str:
    return f"{run_dir(run_id)}/units"


def unit_file(run_id: str, unit_id: int) -> str:
    return f"{units_dir(run_id)}/u{unit_id:08d}.parquet"


def spectra_dir(run_id: str) -> str:
    return f"{run_dir(run_id)}/spectra"


def spectrum_file(run_id: str, tensor_index: int, expert: int | None = None) -> str:
    """A matrix's spectrum while the run is incomplete (one per expert of a stack of experts)."""
    tail = "" if expert is None else f"-e{expert:05d}"
    return f"{spectra_dir(run_id)}/s{tensor_index:08d}{tail}.parquet"


def hashes_dir(run_id: str) -> str:
    return f"{run_dir(run_id)}/hashes"


def hash_file(run_id: str, tensor_index: int) -> str:
    """A tensor's SHA-256 pair (``--hash``) while the run is incomplete; folded into
    ``tensors.parquet`` at commit."""
    return f"{hashes_dir(run_id)}/h{tensor_index:08d}.parquet"


def units_file(run_id: str) -> str:
    """Every unit of a complete run in one file."""
    return f"{run_dir(run_id)}/units.parquet"


def spectra_file(run_id: str) -> str:
    """Every spectrum of a complete run in one file."""
    return f"{run_dir(run_id)}/spectra.parquet"


def tensors_file(run_id: str) -> str:
    return f"{run_dir(run_id)}/tensors.parquet"


def commit_file(run_id: str) -> str:
    return f"{run_dir(run_id)}/commit.parquet"
