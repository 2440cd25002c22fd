"""A store root's files: paths, whole-or-nothing writes, reads, listings, deletions.

The root is a local directory or any URI pyarrow's filesystems take (``s3://bucket/prefix``).
Every file is written whole or not at all: locally under a temporary name then renamed
(atomic on POSIX), on object stores by one PUT, or — for a file streamed in parts — under a
temporary key then copied into place, so a write that fails half-way never replaces a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydiff.errors import StoreError
from raydiff.records import conform, schema, to_table

#: Temporaries: ``<name>.tmp-<32 hex>``; never read as results.
TEMP = re.compile(r"\.tmp-[0-9a-f]{32}$")
_LIST_TRIES = 5  # a folder created while it is listed: see Files._listing


def _is_uri(root: str) -> bool:
    return "://" in root


def redact(root: str) -> str:
    """A store root safe to print: credentials in ``scheme://key:secret@…`` are masked.

    Example:
        >>> redact("s3://AKIA:s3cr3t@bucket/prefix?region=eu-west-1")
        's3://***@bucket/prefix?region=eu-west-1'
    """
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1***@", root)


class Files:
    """The files under a store root. Cheap to create; safe to send to Ray actors."""

    def __init__(self, root: str) -> None:
        self.root = root if _is_uri(root) else os.path.abspath(root)
        self.display = redact(self.root)  # for messages: never print credentials
        self._fs: pafs.FileSystem | None = None
        self._base = ""

    def __reduce__(self):  # filesystems are not all picklable; rebuild on the other side
        return (type(self), (self.root,))

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            try:
                if _is_uri(self.root):
                    self._fs, self._base = pafs.FileSystem.from_uri(self.root)
                else:
                    self._fs, self._base = pafs.LocalFileSystem(), self.root
            except (pa.ArrowException, OSError, ValueError) as e:
                raise StoreError(f"store {self.display}: cannot open ({e})") from None
        return self._fs

    @property
    def is_local(self) -> bool:
        return not _is_uri(self.root)

    def path(self, rel: str) -> str:
        """Filesystem path of a store-relative path."""
        _ = self.fs
        return f"{self._base.rstrip('/')}/{rel}"

    # -- reads -----------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read(self, rel: str, kind: type, columns: list[str] | None = None) -> pa.Table:
        """One file as a table of ``kind``'s current schema (files of older releases conformed).

        Raises:
            StoreError: the file is missing or unreadable.
        """
        try:
            table = pq.read_table(self.path(rel), filesystem=self.fs)
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"store {self.display}: cannot read {rel} ({_short(e)})") from None
        return _select(conform(table, kind), columns)

    def read_many(self, rels: Iterable[str], kind: type, columns: list[str] | None = None) -> pa.Table | None:
        """Files of one kind as one table (``None`` for no files), read in parallel.

        Raises:
            StoreError: a file is missing or unreadable.
        """
        paths = [self.path(r) for r in rels]
        if not paths:
            return None
        try:
            tables = [conform(t, kind) for t in _read_all(paths, self.fs)]
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"store {self.display}: cannot read results ({_short(e)})") from None
        return _select(pa.concat_tables(tables), columns)

    def _listing(self, rel: str) -> list[tuple[str, bool]]:
        """``(name, is a folder)`` of what is directly in a folder; nothing for a folder that
        does not exist.

        A local folder is read with ``os.scandir``: the names its directory held, with the
        types the directory records. pyarrow's local listing reads the names, then asks each
        for its type, and leaves out in silence a file deleted in between: a reader listing a
        record log (:mod:`raydiff.store.log`) as a fold writes its snapshot and deletes the
        entries it folded then saw neither, and missed their records without knowing it
        (1,843 listings of 2,000 torn so, against none through ``os.scandir``; CI once saw a
        reader get 1 event of 64). A file named here and gone when read is what the log's
        readers list again for.

        Elsewhere pyarrow lists; a folder another writer creates while it is listed can make
        that fail with "not found" although the folder exists by then, and such a listing is
        taken again.
        """
        full = self.path(rel)
        if self.is_local:
            try:
                with os.scandir(full) as entries:
                    return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            except FileNotFoundError:
                return []
            except OSError as e:
                raise StoreError(f"store {self.display}: cannot list {rel} ({_short(e)})") from None
        sel = pafs.FileSelector(full, allow_not_found=True)
        for attempt in range(1, _LIST_TRIES + 1):
            try:
                return [(i.base_name, i.type == pafs.FileType.Directory) for i in self.fs.get_file_info(sel)
                        if i.type in (pafs.FileType.File, pafs.FileType.Directory)]
            except (pa.ArrowException, OSError) as e:
                if not (isinstance(e, FileNotFoundError) and attempt < _LIST_TRIES):
                    raise StoreError(f"store {self.display}: cannot list {rel} ({_short(e)})") from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def list_dir(self, rel: str) -> list[str]:
        """Names of the finished ``.parquet`` files directly in a folder (temporaries excluded)."""
        return sorted(name for name, folder in self._listing(rel) if not folder and name.endswith(".parquet"))

    def list_subdirs(self, rel: str) -> list[str]:
        """Names of the folders directly in a folder."""
        return sorted(name for name, folder in self._listing(rel) if folder)

    # -- writes ----------------------------------------------------------------------------

    def write(self, rel: str, records: list, kind: type) -> None:
        """Write records as one Parquet file, atomically (whole file or nothing)."""
        self.write_table(rel, to_table(records, kind))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file, atomically (whole file or nothing)."""
        full = self.path(rel)
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        target = f"{full}.tmp-{uuid.uuid4().hex}" if self.is_local else full
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.is_local:
            os.replace(target, full)

    def write_table(self, rel: str, table: pa.Table) -> None:
        """Write a table as one Parquet file, atomically (whole file or nothing)."""
        full = self.path(rel)
        fs = self.fs
        fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{full}.tmp-{uuid.uuid4().hex}"
            try:
                _write_parquet(table, tmp, fs)
                os.replace(tmp, full)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            _write_parquet(table, full, fs)  # one PUT

    @contextlib.contextmanager
    def writer(self, rel: str, kind: type, staging: str | None = None) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer of ``kind``'s schema whose file appears at ``rel`` only once it is
        whole: each ``write_table`` is one or more row groups of it.

        The file is written under a temporary name (locally) or key (object stores: a
        streamed upload completes even when a write fails) next to ``rel``, or in the folder
        ``staging`` (one whose removal cleans up after a writer that was killed), and moved
        into place after the writer closed without error.
        """
        full = self.path(rel)
        name = full.rsplit("/", 1)[-1]
        tmp = f"{self.path(staging) if staging else full.rsplit('/', 1)[0]}/{name}.tmp-{uuid.uuid4().hex}"
        self.fs.create_dir(tmp.rsplit("/", 1)[0], recursive=True)
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        s = schema(kind)
        plain = [f.name for f in s if not pa.types.is_binary(f.type)]
        w = pq.ParquetWriter(tmp, s, filesystem=self.fs, use_dictionary=plain, write_statistics=plain,
                             compression={f.name: "zstd" if f.name in plain else "none" for f in s})
        try:
            yield w
            w.close()
            self.fs.move(tmp, full)
        except BaseException:
            with contextlib.suppress(Exception):
                w.close()
            raise
        finally:
            with contextlib.suppress(Exception):
                if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    self.fs.delete_file(tmp)

    def delete(self, rel: str) -> None:
        """Delete a file; one that is already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        """Delete a folder and what it holds; one that is already gone is fine."""
        try:
            self.fs.delete_dir(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as e:  # some object stores answer a missing prefix with another error
            if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound:
                raise StoreError(f"store {self.display}: cannot delete {rel} ({_short(e)})") from None


def _read_all(paths: list[str], fs: pafs.FileSystem) -> list[pa.Table]:
    """Each file as its own table (their schemas may be of different releases)."""
    if len(paths) == 1:
        return [pq.read_table(paths[0], filesystem=fs)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(16, len(paths))) as pool:  # object stores: requests in flight at once
        return list(pool.map(lambda p: pq.read_table(p, filesystem=fs), paths))


def _select(table: pa.Table, columns: list[str] | None) -> pa.Table:
    return table.select(columns) if columns is not None else table


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _write_parquet(table: pa.Table, path: str, fs: pafs.FileSystem) -> None:
    """zstd for everything but binary columns: the masks in them are compressed already, and
    Parquet's statistics and dictionary of a megabyte-sized value only cost time. A one-row
    file (a unit, a spectrum, a run) is written uncompressed and without dictionaries, which
    cannot shrink one value: 0.7 ms less per unit."""
    plain = [f.name for f in table.schema if not pa.types.is_binary(f.type)]
    if table.num_rows <= 1:
        pq.write_table(table, path, filesystem=fs, compression="none", use_dictionary=False,
                       write_statistics=plain)
        return
    pq.write_table(table, path, filesystem=fs,
                   compression={f.name: "zstd" if f.name in plain else "none" for f in table.schema},
                   use_dictionary=plain, write_statistics=plain)


def retry_vanished(fn, attempts: int = 5):
    """Call ``fn`` again when a file it read vanished under it (a log folded, a run committed
    by another process meanwhile); other errors are raised at once."""
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, StoreError, pa.ArrowException, OSError) as e:
            if i + 1 == attempts or not _vanished(e):
                raise
            time.sleep(0.05 * (i + 1))
    raise AssertionError("unreachable")


def _vanished(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, FileNotFoundError) or "not exist" in text or "no such file" in text or "not found" in text
