"""The README covers the CLI and the schema; CI runs the README's test command."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from typer.main import get_command

from raydiff.cli.main import app
from raydiff.query.views import connect

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_every_command_has_help_and_is_in_the_readme():
    group = get_command(app)
    assert group.commands
    for name, cmd in group.commands.items():
        assert cmd.help and len(cmd.help) > 20, name
        assert f"raydiff {name}" in README, name
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, (name, p.name)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(b.strip() for b in _code_blocks(README) if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_cmd
    demo_cmd = next(b.strip() for b in _code_blocks(README) if "raydiff demo" in b)
    assert demo_cmd.startswith("python3 -m venv .venv") and demo_cmd.endswith("raydiff demo")


def test_every_view_column_is_documented():
    con = connect(tempfile.mkdtemp())
    for view in ("runs", "tensors"):
        section = DOCS["sql.md"].split(f"## `{view}` columns", 1)[1].split("\n## ", 1)[0]
        for (col, *_rest) in con.execute(f"DESCRIBE {view}").fetchall():
            assert f"`{col}`" in section, (view, col)


def test_every_submit_option_is_in_the_options_table():
    submit = get_command(app).commands["submit"]
    for p in submit.params:
        if p.param_type_name == "option":
            assert f"| `{p.opts[0]}` |" in DOCS["operations.md"], p.opts[0]


def test_the_readme_is_short_and_every_link_resolves():
    """The README is the path in (≤ 10 KB); every relative link of it and of docs/ names a
    file that exists, and a #section of a page that has it."""
    assert len(README.encode()) <= 10_000
    pages = {"README.md": README, **{f"docs/{k}": v for k, v in DOCS.items()}}
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            where = (ROOT / page).parent / path if path else ROOT / page
            assert where.exists(), (page, target)
            if anchor and where.suffix == ".md":
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-")
                         for h in re.findall(r"^#+ (.+)$", where.read_text(), re.M)}
                assert anchor in slugs, (page, target, sorted(slugs))
    assert {f"docs/{k}" for k in DOCS} <= {f"docs/{t}" for t in re.findall(r"\(docs/([\w.-]+\.md)", README)}


#: Every view and table macro a user queries, with arguments that bind on an empty store.
VIEWS = ("runs", "tensors", "units", "masks", "spectra", "plan", "progress", "tensor_modules", "layers",
         "experts", "sparsity_by_tolerance", "watch_events", "chains")
MACROS = ("overlap('a', 'b')", "overlap_total('a', 'b')", "consensus(['a', 'b'])", "profile('a', 't')",
          "jaccard_matrix(['a', 'b'])", "chain_steps('a')", "chain_summary('a')")


def test_every_column_of_every_view_and_macro_is_selectable_by_its_bare_name():
    con = connect(tempfile.mkdtemp())
    reserved = {k for (k,) in con.execute(
        "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category <> 'unreserved'").fetchall()}
    assert "both" in reserved  # the check below can fail
    for source in (*VIEWS, *MACROS):
        cols = [c for (c, *_rest) in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
        assert cols, source
        assert not set(cols) & reserved, (source, set(cols) & reserved)
        con.execute(f"SELECT {', '.join(cols)} FROM {source} LIMIT 0")  # a parser error if any needs quotes
        name = source.split("(")[0]
        if source in MACROS:  # the docs' table lists each macro's columns
            row = next(line for line in DOCS["sql.md"].splitlines() if line.startswith(f"| `{name}("))
            missing = [c for c in cols if c not in row.replace("`", " ").replace(",", " ").split()]
            assert name == "overlap_total" or not missing, (name, missing)
