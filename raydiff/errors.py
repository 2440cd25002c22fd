"""Exceptions raised by the raydiff library.

Every error a user can cause is a :class:`RaydiffError` whose message names the object at
fault (file, tensor, run) and says what to do about it. The CLI turns these into a single
``Error: …`` line; any other exception is a bug in raydiff.
"""

from __future__ import annotations


class RaydiffError(Exception):
    """Base class of all user-facing raydiff errors.

    ``option`` names the option at fault, when one is: a field of :mod:`raydiff.options`
    (``atol``, ``rename``, ``strict``…). The message then begins with that name, in the
    library's words (``atol must be a finite number >= 0``), and the CLI and the watch file
    put their own name for it in its place (``--atol``, ``options.atol``):
    :meth:`for_option`.
    """

    def __init__(self, message: str = "", *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    def __reduce__(self):  # keep ``option`` across processes
        return (_rebuild, (type(self), str(self), self.option))

    def for_option(self, name: str) -> str:
        """The message, with the option it begins with called ``name``.

        Example:
            >>> InvalidOption("atol must be >= 0", option="atol").for_option("--atol")
            '--atol must be >= 0'
        """
        text = str(self)
        if self.option and text.startswith(self.option):
            return name + text[len(self.option):]
        return text


def _rebuild(kind: type, message: str, option: str | None) -> RaydiffError:
    e = kind.__new__(kind)
    RaydiffError.__init__(e, message, option=option)
    return e


class InvalidOption(RaydiffError):
    """An option value is out of range or inconsistent with another option."""


class CheckpointNotFound(RaydiffError):
    """A checkpoint reference names nothing that exists (path, Hub repo or revision)."""


class UnsupportedFormat(RaydiffError):
    """The checkpoint is in a format raydiff refuses to read (e.g. pickle ``.bin``/``.pt``)."""


class InvalidCheckpoint(RaydiffError):
    """A safetensors file or index is malformed, truncated or inconsistent."""


class PlanProblem(RaydiffError):
    """The two checkpoints cannot be paired as asked (rename collision, ``--strict``)."""


class StoreError(RaydiffError):
    """The store is unreadable, inconsistent, or a run in it cannot be resumed."""


class RunNotFound(RaydiffError):
    """A run id or name matches no run in the store (or matches several)."""


class QueryError(RaydiffError):
    """A SQL query given to ``raydiff sql`` failed."""


class HubError(RaydiffError):
    """The Hugging Face Hub failed or refused a request (down, rate-limited, bad token)."""


class InvalidWatchList(RaydiffError):
    """A watch list (``watch.toml``) is malformed; the message names the file and the key."""


class OutputExists(RaydiffError):
    """An output path (``--out``) exists and ``--force`` was not given, or it is something
    raydiff will not replace even with ``--force`` (a directory it did not write)."""


class BaseMismatch(RaydiffError):
    """Runs, a mask or a patch belong to another base than the one given: the message names
    both bases (or the tensor whose bytes differ from those recorded)."""


class InvalidPatch(RaydiffError):
    """A patch directory is malformed, missing a shard, truncated or tampered with (its
    files do not match the sizes and SHA-256 digests its index records)."""


class ChainConflict(RaydiffError):
    """A chain of checkpoints is submitted with another base or other checkpoints than its
    recorded steps: the message names the chain, the step and both checkpoints."""


class ClusterUnavailable(RaydiffError):
    """The Ray cluster could not be started or reached."""


class WorkFailed(RaydiffError):
    """A unit or spectrum failed in an actor for a reason raydiff did not foresee (a bug).

    The message names the run, the tensor and the unit; ``detail`` holds the actor's
    traceback, which the CLI shows under ``--debug``. The run stays incomplete and resumable.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    def __reduce__(self):  # crosses process boundaries (Ray) with its detail
        return (type(self), (str(self), self.detail))
