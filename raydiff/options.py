"""The options of an analysis, validated once and shared by the library and every command.

Two groups: :class:`DiffOptions` change *results* (they are part of a run's identity, so a
resubmission with the same pair and the same DiffOptions resumes the same run), while
:class:`ClusterOptions` only change *how* the work is executed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from raydiff.errors import InvalidOption

RankMode = Literal["exact", "sketch", "off"]
RANK_MODES: tuple[str, ...] = ("exact", "sketch", "off")

#: Absolute tolerances whose change counts are stored for every run (the paper's ladder),
#: so SQL can compare criteria without re-running. The one definition: records store a run's
#: counts as a list in this order, and the views name a column per step (``changed_1e8`` for
#: 1e-8, see :func:`ladder_name`) — adding a step here adds its columns everywhere.
ATOL_LADDER: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)


def ladder_name(t: float) -> str:
    """The suffix of a ladder step's columns: ``1e-8`` → ``1e8``, ``2.5e-5`` → ``2p5e5``.

    Example:
        >>> [ladder_name(t) for t in ATOL_LADDER]
        ['1e8', '1e7', '1e6', '1e5', '1e4']
    """
    mantissa, exp = f"{t:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".").replace(".", "p")
    return f"{mantissa}e{abs(int(exp))}" if int(exp) < 0 else f"{mantissa}e_{int(exp)}"

#: Relative cut-offs at which the rank of an update is also reported (σ_i > c · σ_1).
RANK_CUTOFFS: tuple[float, ...] = (1e-1, 1e-2, 1e-3)

DEFAULT_STORE = "./raydiff-store"
DEFAULT_CHUNK_ELEMS = 1 << 24  # 16 Mi elements: 32 MiB per side for bf16
DEFAULT_SUBSPACE_K = 16


def default_store() -> str:
    """The store root used when none is given: ``$RAYDIFF_STORE`` or ``./raydiff-store``."""
    return os.environ.get("RAYDIFF_STORE") or DEFAULT_STORE


@dataclass(frozen=True)
class DiffOptions:
    """Options that change what a run computes (and so are part of its identity).

    Attributes:
        atol: absolute tolerance of the run's main criterion: an entry is *changed* when
            ``|tuned − base| > atol``, Δ taken in the compared dtype (paper: 1e-5).
            ``atol=0`` makes any value change count.
        rel_eta: η of the relative criterion ``|Δ| > η·max(|w|, |ŵ|)`` (Zhu et al.: 1e-3).
        rank: ``exact`` (SVD, as the paper), ``sketch`` (randomised SVD of the top
            ``sketch_rank`` directions) or ``off``.
        top_k: how many leading singular values are stored per matrix.
        sketch_rank: size of the randomised sketch (``rank=sketch`` only).
        hash: record the SHA-256 of each tensor's stored bytes on both sides, computed in the
            same read as the diff (the units of a tensor then run in order on one actor).
        subspace_k: k of the per-matrix subspace metrics (principal angles between the top-k
            singular subspaces of base and tuned, top-k spectral shift); 0 turns them off.
            They ride on the matrix pass, so ``rank=off`` skips them too.
        chunk_elems: target elements per work unit; units of tensors with ≥ 2 dims cover
            whole rows. Masks of runs line up only when their chunk sizes are equal.
        rename: prefix rules ``(old, new)`` applied to tensor names of both sides before
            pairing (first match wins), e.g. ``(("model.language_model.", "model."),)``.
        ladder: the absolute tolerances counted besides ``atol`` (default
            :data:`ATOL_LADDER`; no CLI flag: the views name their columns after it).

    Example:
        >>> DiffOptions(atol=1e-6, rank="sketch").rank
        'sketch'
    """

    atol: float = 1e-5
    rel_eta: float = 1e-3
    rank: RankMode = "exact"
    top_k: int = 32
    sketch_rank: int = 128
    subspace_k: int = DEFAULT_SUBSPACE_K
    hash: bool = False
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    rename: tuple[tuple[str, str], ...] = ()
    ladder: tuple[float, ...] = ATOL_LADDER

    def __post_init__(self) -> None:
        if not (math.isfinite(self.atol) and self.atol >= 0):
            raise InvalidOption(f"atol must be a finite number >= 0, got {self.atol!r}", option="atol")
        if not (math.isfinite(self.rel_eta) and 0 < self.rel_eta < 1):
            raise InvalidOption(f"rel_eta must be in (0, 1), got {self.rel_eta!r}", option="rel_eta")
        if self.rank not in RANK_MODES:
            raise InvalidOption(f"rank must be one of {', '.join(RANK_MODES)}, got {self.rank!r}", option="rank")
        if not 1 <= self.top_k <= 4096:
            raise InvalidOption(f"top_k must be between 1 and 4096, got {self.top_k}", option="top_k")
        if not 1 <= self.sketch_rank <= 8192:
            raise InvalidOption(f"sketch_rank must be between 1 and 8192, got {self.sketch_rank}", option="sketch_rank")
        if not 0 <= self.subspace_k <= 1024:
            raise InvalidOption(f"subspace_k must be between 0 and 1024, got {self.subspace_k}", option="subspace_k")
        if not 1024 <= self.chunk_elems <= 1 << 31:
            raise InvalidOption(f"chunk_elems must be between 1024 and 2^31, got {self.chunk_elems}", option="chunk_elems")

        if not self.ladder or any(not (math.isfinite(t) and t > 0) for t in self.ladder) or \
                list(self.ladder) != sorted(set(self.ladder)):
            raise InvalidOption(f"ladder must be increasing finite tolerances > 0, got {self.ladder!r}",
                                option="ladder")
        for rule in self.rename:
            if len(rule) != 2 or not rule[0]:
                raise InvalidOption(f"rename rules are OLD=NEW with a non-empty OLD prefix, got {rule!r}",
                                    option="rename")

    def identity(self) -> dict[str, object]:
        """The fields that define a run's results, for hashing into its run id (the default
        ladder left out, so runs of releases before it was an option keep their ids)."""
        out = asdict(self)
        if self.ladder == ATOL_LADDER:
            del out["ladder"]
        if self.subspace_k == DEFAULT_SUBSPACE_K:  # the same: runs from before it keep their ids
            del out["subspace_k"]
        if not self.hash:
            del out["hash"]
        return out


def parse_rename(rules: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``OLD=NEW`` rules (``--rename``, a watch file's ``rename``) as ``(old, new)`` pairs.

    Raises:
        InvalidOption: a rule without ``=`` or with an empty OLD prefix.

    Example:
        >>> parse_rename(["model.language_model.=model."])
        (('model.language_model.', 'model.'),)
    """
    out = []
    for rule in rules:
        old, sep, new = rule.partition("=") if isinstance(rule, str) else ("", "", "")
        if not sep or not old:
            raise InvalidOption(f"rename rules are OLD=NEW with a non-empty OLD prefix, got {rule!r}", option="rename")
        out.append((old, new))
    return tuple(out)


#: How actors read Hub files (see :attr:`ClusterOptions.hub_fetch`).
HUB_FETCH = ("ranges", "cache")
#: Where a run's work executes: ``ray`` (a cluster's actors), ``local`` (this process's
#: threads), ``auto`` (local on one machine with no GPU and no cluster given, else ray).
BACKENDS = ("auto", "ray", "local")


@dataclass(frozen=True)
class ClusterOptions:
    """Options that change how a run executes but never its results.

    Attributes:
        address: Ray cluster address; ``None`` uses ``$RAY_ADDRESS`` or starts a local cluster.
        workers: number of diff actors; ``None`` sizes the pool to the cluster's CPUs.
        gpus_per_actor: GPU fraction requested per actor when the cluster has GPUs.
        keep_actors: keep the actor pool alive after the run for the next submission from
            this process (saves 1–3 s of actor start per run; the kept actors hold their
            CPUs/GPUs, so leave it off on a cluster shared with other drivers).
        hub_fetch: how actors read Hub checkpoints not already in their node's Hugging Face
            cache: ``ranges`` (each unit's bytes by HTTP range, nothing written to disk) or
            ``cache`` (each needed shard downloaded once into the node's cache, for
            checkpoints analysed again and again, such as a watched base).
        backend: ``auto`` (default) runs on this process's threads when no cluster is given
            (no ``address``, no ``$RAY_ADDRESS``, Ray not already connected) and the machine
            has no GPU, else on Ray; ``ray`` always uses Ray (a new local cluster when no
            address is given); ``local`` always uses this process's threads (``workers`` of
            them, default one per core). One machine gains no speed from a Ray cluster (the
            kernel releases the GIL and is memory- or disk-bound) and a local cluster costs
            ≈ 7 s to start and 1.4 s to stop, so ``auto`` keeps Ray for what only it gives:
            several nodes and GPUs.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_actor: float = 1.0
    keep_actors: bool = False
    hub_fetch: str = "ranges"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.workers is not None and not 1 <= self.workers <= 4096:
            raise InvalidOption(f"workers must be between 1 and 4096, got {self.workers}", option="workers")
        if not 0 < self.gpus_per_actor <= 8:
            raise InvalidOption(f"gpus_per_actor must be in (0, 8], got {self.gpus_per_actor}", option="gpus_per_actor")
        if self.hub_fetch not in HUB_FETCH:
            raise InvalidOption(f"hub_fetch must be one of {', '.join(HUB_FETCH)}, got {self.hub_fetch!r}", option="hub_fetch")
        if self.backend not in BACKENDS:
            raise InvalidOption(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}", option="backend")
        if self.backend == "local" and self.address:
            raise InvalidOption("backend local runs in this process; an address names a Ray cluster: drop one",
                                option="backend")


@dataclass(frozen=True)
class SubmitOptions:
    """Everything ``submit`` needs besides the two checkpoint references.

    ``strict`` refuses to run when any tensor is not matched exactly (renamed, tied,
    resized, widened, or not compared at all) instead of recording the decision.
    """

    store: str = field(default_factory=default_store)
    name: str | None = None
    strict: bool = False
    diff: DiffOptions = field(default_factory=DiffOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
