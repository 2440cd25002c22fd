"""``raydiff`` commands: parse, validate, call one library function, format the output.

Library errors (:class:`raydiff.errors.RaydiffError`) become one ``Error: …`` line on stderr
and exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer

from raydiff.errors import RaydiffError
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions, default_store, parse_rename

app = typer.Typer(
    name="raydiff",
    help="What did this finetune change? Diff LLM checkpoints on Ray into a Parquet store, query it with SQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal brackets: org/name[@revision]
)

_state = {"debug": False}
T = TypeVar("T")

StoreOpt = typer.Option(None, "--store", help="Store root (directory or s3:// URI). Default: $RAYDIFF_STORE or ./raydiff-store.")
FormatOpt = typer.Option("table", "--format", "-f", help=(
    "Output format: table (for the eye: floats rounded to 6 significant digits, BLOBs as <N bytes>), "
    "csv or json (lossless: shortest round-trip doubles, exact integers and decimals, ISO 8601 times, "
    "BLOBs in base64; JSON spells NaN and ±Inf as the strings \"NaN\", \"Infinity\", \"-Infinity\")."))


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    _state["debug"] = debug


def _call(fn: Callable[[], T]) -> T:
    """Run a library call; a RaydiffError becomes `Error: …` and exit code 1."""
    try:
        return fn()
    except RaydiffError as e:
        if _state["debug"]:
            if getattr(e, "detail", ""):  # the traceback of the actor the error came from
                typer.echo(f"In the actor:\n{e.detail}", err=True)
            raise
        typer.echo(f"Error: {_flagged(e)}", err=True)
        raise typer.Exit(1) from None


def _flagged(e: RaydiffError) -> str:
    """A library message with the option it names called by its flag (``atol`` → ``--atol``)."""
    return e.for_option("--" + e.option.replace("_", "-")) if e.option else str(e)


def _fail(message: str) -> None:
    """A usage problem found by the CLI itself: `Error: …`, exit code 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def _store(store: str | None) -> str:
    return store or default_store()


def _show(table: Any, fmt: str) -> None:
    """Print a result table in the chosen format (see :mod:`raydiff.cli.render`)."""
    from raydiff.cli.render import FORMATS, render

    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    typer.echo(render(table, fmt))


@app.command()
def submit(
    ctx: typer.Context,
    base: str = typer.Argument(..., help="Base checkpoint: local dir/file or org/name[@revision]."),
    tuned: list[str] = typer.Argument(..., metavar="TUNED [TUNED…]", help="Finetuned checkpoint: local dir/file or org/name[@revision]; several only with --chain, in training order."),
    store: str | None = StoreOpt,
    name: str | None = typer.Option(None, "--name", help="Run name (default: last part of TUNED)."),
    chain: str | None = typer.Option(None, "--chain", metavar="NAME", help="The TUNED checkpoints are one training run, in order: analyse each against BASE and against the one before it, every change counted (atol 0), and record them as chain NAME (the chain_steps and chain_summary macros). Complete runs are reused: giving the chain again, or with more checkpoints, computes only what is new."),
    atol: float = typer.Option(1e-5, "--atol", help="Changed means |tuned - base| > ATOL (paper: 1e-5)."),
    rel_eta: float = typer.Option(1e-3, "--rel-eta", help="η of the relative criterion |Δ| > η·max(|w|,|ŵ|)."),
    rank: str = typer.Option("exact", "--rank", help="Rank of ΔW per matrix: exact (SVD), sketch (randomised), off."),
    top_k: int = typer.Option(32, "--top-k", help="Leading singular values stored per matrix."),
    sketch_rank: int = typer.Option(128, "--sketch-rank", help="Sketch size for --rank sketch."),
    hash_: bool = typer.Option(False, "--hash", help="Record the SHA-256 of each tensor's stored bytes on both sides (tensors.base_sha256, tuned_sha256), computed in the same read as the diff; a tensor's units then run in order on one actor. Costs about one core-second per 1.3 GB read."),
    subspace_k: int = typer.Option(16, "--subspace-k", help="k of the per-matrix subspace metrics: principal angles between the top-k singular subspaces of base and tuned, and the top-k spectral shift (a randomised SVD of each side: about 2 s per 4096×14336 matrix on 2 CPU cores). 0 turns them off; --rank off skips every per-matrix metric."),
    chunk_elems: int = typer.Option(1 << 24, "--chunk-elems", help="Elements per work unit (masks of runs line up only for equal values)."),
    rename: list[str] = typer.Option([], "--rename", metavar="OLD=NEW", help="Rewrite tensor-name prefix OLD to NEW on both sides before pairing (repeatable; first match wins). Without it, tuned's names that differ from base's by one prefix (transformer.h.0.… against h.0.…) take base's."),
    strict: bool = typer.Option(False, "--strict", help="Refuse to run unless every tensor matches exactly (no renames, ties, resized rows, dtype widening, FP8 block scales, fused slices or unmatched tensors)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)."),
    workers: int | None = typer.Option(None, "--workers", help="Number of diff actors (default: one per CPU, or per GPU share; more than the cluster holds run on those that start), or of threads with --backend local."),
    gpus_per_actor: float = typer.Option(1.0, "--gpus-per-actor", help="GPU fraction per actor on GPU clusters."),
    hub_fetch: str = typer.Option("ranges", "--hub-fetch", help="How actors read Hub checkpoints missing from their node's HF cache: ranges (each unit's bytes by HTTP range, no disk) or cache (download each needed shard once into the node's cache)."),
    backend: str = typer.Option("auto", "--backend", help="Where the work runs: ray (a Ray cluster's actors: --address, $RAY_ADDRESS, else a new local cluster), local (this process, --workers threads, default one per core) or auto: local on one machine with no GPU when no cluster is given, else ray. One machine gains no speed from a local Ray cluster, which costs about 7 s to start and 1.4 s to stop."),
) -> None:
    """Diff TUNED against BASE into the store, on a Ray cluster or in this process; prints the run id.

    Resubmitting the same pair with the same options resumes an interrupted run instead of
    starting over, and returns a complete run unchanged. With --chain, several TUNED are the
    checkpoints of one training run: each is diffed against BASE and against the one before
    it, and the chain's steps are printed.
    """
    if chain is None and len(tuned) > 1:
        _fail(f"{len(tuned)} TUNED checkpoints given: submit diffs one TUNED against BASE, or with --chain NAME "
              "the checkpoints of one training run in order")
    if chain is not None and name is not None:
        _fail("--chain names its runs (<chain>:<t> against BASE, <chain>:<t-1>-<t> per step); drop --name")
    if chain is not None and atol != 0 and getattr(ctx.get_parameter_source("atol"), "name", "") == "COMMANDLINE":
        _fail("--chain counts every change (atol 0), so that steps far below any tolerance count; drop --atol")
    options = _call(lambda: SubmitOptions(
        store=_store(store), name=name, strict=strict,
        diff=DiffOptions(atol=atol, rel_eta=rel_eta, rank=rank, top_k=top_k,  # type: ignore[arg-type]
                         sketch_rank=sketch_rank, subspace_k=subspace_k, hash=hash_, chunk_elems=chunk_elems,
                         rename=parse_rename(rename)),
        cluster=ClusterOptions(address=address, workers=workers, gpus_per_actor=gpus_per_actor, hub_fetch=hub_fetch,
                               backend=backend),
    ))
    from raydiff.cli.progress import submit_with_progress

    if chain is not None:
        _submit_chain(base, tuned, chain, options)
        return
    result = _call(lambda: submit_with_progress(base, tuned[0], options))
    typer.echo(_run_line(result), err=True)
    typer.echo(f"matching: {result.matching}", err=True)
    typer.echo(result.run_id)


def _run_line(result: Any, what: str = "") -> str:
    """One line on a submitted run: id, name, state, changed entries, sparsity."""
    c = result.commit
    state = "already complete" if result.already_complete else ("resumed, complete" if result.resumed else "complete")
    sparsity = 1 - c.changed / c.numel if c.numel else float("nan")
    skipped = ""
    if c.n_spectra_skipped:
        skipped = (f"; {c.n_spectra_skipped} of {c.n_spectra} spectra not computed (ΔW not finite: see the note "
                   "column of tensors)")
    return (f"run {result.run_id} ({result.run.name}{what}): {state}; {c.changed:,} of {c.numel:,} entries changed "
            f"(|Δ| > {result.run.atol:g}), sparsity {sparsity:.2%}{skipped}")


def _submit_chain(base: str, tuned: list[str], chain: str, options: SubmitOptions) -> None:
    """``submit --chain``: a line per run as it completes, then the chain's steps as a table."""
    from raydiff.cli.progress import submit_chain_with_progress
    from raydiff.query.views import query_table

    def on_run(r: Any) -> None:
        what = f", step {r.step} vs base" if r.kind == "vs_base" else f", step {r.step} vs step {r.step - 1}"
        typer.echo(_run_line(r.result, what), err=True)

    result = _call(lambda: submit_chain_with_progress(base, tuned, chain, options, on_run))
    reused = sum(r.result.already_complete for r in result.runs)
    typer.echo(f"chain {chain}: {len(result.steps)} steps; {len(result.runs) - reused} runs computed, {reused} reused, "
               f"{result.recorded} steps newly recorded", err=True)
    table = _call(lambda: query_table(options.store, (
        "SELECT step, tuned, numel, changed_vs_base, changed_since_prev, 1 - changed_since_prev / numel AS "
        "step_sparsity, changed_ever, cancelled FROM chain_steps(?)"), [chain]))
    _show(table, "table")


@app.command()
def runs(store: str | None = StoreOpt, fmt: str = FormatOpt) -> None:
    """List the runs in the store with their status and sparsity."""
    from raydiff.query.views import query_table

    table = _call(lambda: query_table(_store(store), "SELECT run_id, name, status, numel, changed, sparsity, "
                                      "atol, rank_mode, base, tuned FROM runs ORDER BY created_at"))
    _show(table, fmt)


@app.command()
def sql(
    query_text: str = typer.Argument(..., metavar="QUERY", help="SQL over the views (runs, tensors, units, masks, spectra, plan)."),
    store: str | None = StoreOpt,
    fmt: str = FormatOpt,
) -> None:
    """Run a SQL query over the store with DuckDB (read-only) and print the result."""
    from raydiff.query.views import query_table

    _show(_call(lambda: query_table(_store(store), query_text)), fmt)


@app.command()
def overlap(
    runs_: list[str] = typer.Argument(..., metavar="RUN RUN [RUN…]", help="Two or more complete runs over one base (names or ids)."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="For exactly two runs: one row per tensor instead of the total."),
    store: str | None = StoreOpt,
    fmt: str = FormatOpt,
) -> None:
    """Subnetwork overlap o1/o2 (and Jaccard) of every pair of runs, against the random baseline."""
    from raydiff.query.overlap import pairwise
    from raydiff.query.views import arrow_result

    if len(runs_) < 2 or (per_tensor and len(runs_) != 2):
        _fail("--per-tensor takes exactly two runs" if per_tensor else "overlap needs two or more runs")
    if per_tensor:
        table = _call(lambda: _with_connection(
            _store(store), lambda con: arrow_result(con, "SELECT * FROM overlap(?, ?)", runs_)))
    else:
        table = _call(lambda: _with_connection(_store(store), lambda con: pairwise(con, runs_)))
    _show(table, fmt)


@app.command()
def layers(
    run: str = typer.Argument(..., help="A complete run (name or id)."),
    store: str | None = StoreOpt,
    fmt: str = FormatOpt,
) -> None:
    """Sparsity per transformer layer and module kind for one run (module '*' = whole layer)."""
    from raydiff.query.views import query_table

    table = _call(lambda: query_table(_store(store), (
        "SELECT layer, module, n_tensors, numel, changed, sparsity_weighted, sparsity_mean, mean_rank_ratio "
        "FROM layers WHERE run_id = run_ref(?) ORDER BY layer NULLS FIRST, module = '*', module"), [run]))
    _show(table, fmt)


@app.command()
def consensus(
    runs_: list[str] = typer.Argument(..., metavar="RUN RUN [RUN…]", help="Two or more complete runs over one base."),
    store: str | None = StoreOpt,
    fmt: str = FormatOpt,
) -> None:
    """Per tensor, how many entries are changed in exactly k of the N runs (k = 0…N)."""
    from raydiff.query.views import query_table

    if len(runs_) < 2:
        _fail("consensus needs two or more runs")
    _show(_call(lambda: query_table(_store(store), "SELECT * FROM consensus(?::VARCHAR[])", [runs_])), fmt)


@app.command()
def report(
    runs_: list[str] = typer.Argument(..., metavar="RUN [RUN…]", help="Complete runs (names or ids)."),
    out: str = typer.Option("raydiff-report", "--out", help="Directory for report.html and the PNG figures."),
    store: str | None = StoreOpt,
) -> None:
    """Write a self-contained HTML report with plots (and each plot as a PNG) for runs."""
    from raydiff.query.report import write_report

    path = _call(lambda: write_report(_store(store), runs_, out))
    typer.echo(str(path))


ForceOpt = typer.Option(False, "--force", help="Replace --out if it exists (a file, or a folder raydiff wrote).")


@app.command("export-mask")
def export_mask(
    runs_: list[str] = typer.Argument(..., metavar="RUN [RUN…]", help="Complete runs over one base (names or ids)."),
    out: str = typer.Option(..., "--out", help="The .safetensors file to write: one bool tensor per compared tensor."),
    min_runs: int = typer.Option(1, "--min-runs", help="Set entries changed in at least K of the runs (1 ≤ K ≤ number of runs)."),
    store: str | None = StoreOpt,
    force: bool = ForceOpt,
) -> None:
    """Write the runs' change masks as a safetensors file of bool tensors, one per compared tensor.

    An entry is set when it changed (|Δ| > atol, the run's criterion) in at least --min-runs
    of the runs; the masks load with safetensors.torch.load_file, ready for
    param.grad.mul_(mask).
    """
    from raydiff.query.export import export_mask as export

    r = _call(lambda: export(_store(store), runs_, out, min_runs=min_runs, force=force))
    share = r.set / r.numel if r.numel else 0.0
    typer.echo(f"{r.path}: {r.tensors} masks, {r.set:,} of {r.numel:,} entries set ({share:.2%}; changed in "
               f"≥ {r.min_runs} of {len(r.runs)} runs)", err=True)
    typer.echo(r.path)


@app.command()
def patch(
    base: str = typer.Argument(..., help="Base checkpoint: local dir/file or org/name[@revision]."),
    tuned: str = typer.Argument(..., help="Finetuned checkpoint: local dir/file or org/name[@revision]."),
    out: str = typer.Option(..., "--out", help="The patch folder to write (sharded safetensors and patch.index.json)."),
    shard_mb: float = typer.Option(1024, "--shard-mb", help="Input MiB (base + tuned) per patch shard: the unit of work and of resuming; a larger tensor gets a shard of its own."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)."),
    workers: int | None = typer.Option(None, "--workers", help="Number of actors (default: one per CPU)."),
    force: bool = ForceOpt,
) -> None:
    """Write what TUNED changed from BASE, bit for bit, as a sparse patch folder.

    Per tensor: the indices and tuned values of the entries whose bits differ (tensors new in
    TUNED, or of another shape or dtype, whole), with the SHA-256 of both sides' bytes. Running
    it again with the same --out resumes a patch cut short.
    """
    from raydiff.run.patch import make_patch

    if not shard_mb * (1 << 20) >= 1:
        _fail(f"--shard-mb must be a positive number, got {shard_mb}")
    r = _call(lambda: make_patch(base, tuned, out, cluster=ClusterOptions(address=address, workers=workers),
                                 shard_bytes=int(shard_mb * (1 << 20)), force=force))
    share = r.patch_bytes / r.tuned_bytes if r.tuned_bytes else 0.0
    typer.echo(f"{r.path}: {r.shards} shards, {r.patch_bytes:,} bytes ({share:.1%} of the tuned checkpoint's "
               f"{r.tuned_bytes:,}); {r.sparse} tensors as changed entries ({r.changed:,} stored), {r.whole} whole, "
               f"{r.dropped} only in base{'; resumed' if r.resumed else ''}", err=True)
    typer.echo(r.path)


@app.command("apply")
def apply_(
    base: str = typer.Argument(..., help="The base checkpoint the patch was made from."),
    patch_dir: str = typer.Argument(..., metavar="PATCH", help="A folder written by raydiff patch."),
    out: str = typer.Option(..., "--out", help="The folder of the rebuilt checkpoint (tuned's shard names)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)."),
    workers: int | None = typer.Option(None, "--workers", help="Number of actors (default: one per CPU)."),
    force: bool = ForceOpt,
) -> None:
    """Rebuild the tuned checkpoint from BASE and a patch, every tensor checked by SHA-256.

    The patch is checked whole (sizes and SHA-256 of its shards) before anything is written,
    and a BASE whose tensors differ from those the patch recorded is refused. Running it
    again with the same --out resumes an apply cut short.
    """
    from raydiff.run.patch import apply_patch

    r = _call(lambda: apply_patch(base, patch_dir, out, cluster=ClusterOptions(address=address, workers=workers),
                                  force=force))
    rate = r.nbytes / r.seconds / 1e9 if r.seconds else 0.0
    typer.echo(f"{r.path}: {r.shards} shards, {r.tensors} tensors, {r.nbytes:,} bytes, each tensor's SHA-256 "
               f"verified ({rate:.2f} GB/s){'; resumed' if r.resumed else ''}", err=True)
    typer.echo(r.path)


def _with_connection(store: str, fn: Callable[[Any], T]) -> T:
    import duckdb

    from raydiff.errors import QueryError
    from raydiff.query.views import connect, one_line

    con = connect(store)
    try:
        return fn(con)
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
    finally:
        con.close()


@app.command()
def demo(
    store: str | None = StoreOpt,
    family_dir: str | None = typer.Option(None, "--family-dir", help="Where the demo checkpoints are built/reused (default: <store>/demo-family)."),
    workers: int | None = typer.Option(None, "--workers", help="Number of diff actors."),
) -> None:
    """Build (or reuse) a small demo finetune family, submit each finetune against its base, print a report."""
    from raydiff.demo import run_demo

    report = _call(lambda: run_demo(_store(store), family_dir, ClusterOptions(workers=workers),
                                    log=lambda msg: typer.echo(msg, err=True)))
    typer.echo(report)


@app.command()
def watch(
    file: str = typer.Argument(..., metavar="WATCH_TOML", help="Watch list: base, tuned repos or patterns, branches/tags, options, schedule."),
    once: bool = typer.Option(False, "--once", help="Run one tick and exit 0 (for cron or a Kubernetes CronJob)."),
    store: str | None = typer.Option(None, "--store", help="Store root; overrides the file's `store` (default: $RAYDIFF_STORE or ./raydiff-store)."),
    webhook: str | None = typer.Option(None, "--webhook", metavar="HOST:PORT", help="Also listen for Hugging Face webhooks (POST /webhook, secret in $RAYDIFF_WEBHOOK_SECRET) and tick a repo at once when one names it."),
) -> None:
    """Analyse newly published Hub revisions against a base, on a schedule (interval or cron).

    Each tick lists the watched branches and tags, submits the commits that have no complete
    run yet (skipping those whose weights did not change), and records what it did in the
    store (the `watch_events` view). Failures are recorded and retried with back-off.
    Without --once it ticks until SIGTERM or Ctrl-C; a restart repeats nothing and misses
    nothing. With --webhook a Hub webhook starts a tick of its repo at once.
    """
    from raydiff import watch as w
    from raydiff.cli.watching import event_line, follow, tick_line

    wl = _call(lambda: w.load(file, store))
    if once:
        if webhook:
            _fail("--webhook listens for as long as the watch runs; drop --once")
        report = _call(lambda: w.tick(wl, on_event=lambda e: typer.echo(event_line(e))))
        typer.echo(tick_line(report, None))
        return
    _call(lambda: follow(wl, webhook))


store_app = typer.Typer(help="Maintain a store: convert one written by an earlier raydiff to the current layout.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("upgrade")
def store_upgrade(store: str | None = StoreOpt) -> None:
    """Convert a store of an earlier layout in place (repeat it to finish one cut short).

    A store written before the catalog (layout 1) is refused by every other command until
    converted: each complete run is folded into one file per run and entered in the catalog,
    each incomplete run stays resumable.
    """
    from raydiff.store.upgrade import upgrade

    done = _call(lambda: upgrade(_store(store), note=lambda m: typer.echo(m, err=True)))
    if done.already:
        typer.echo(f"store {_store(store)}: already of the current layout; nothing to do")
    else:
        typer.echo(f"store {_store(store)}: upgraded: {done.complete} complete runs, {done.incomplete} incomplete, "
                   f"{done.events} watch events")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
