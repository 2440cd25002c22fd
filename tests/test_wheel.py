"""The built wheel installs cli/ and queries/ under the raydiff package, and works from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_layout_and_queries_load_from_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("raydiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "raydiff/cli/main.py" in names and "raydiff/py.typed" in names
    assert "raydiff/queries/00_runs.sql" in names and "raydiff/queries/30_overlap.sql" in names
    assert not [n for n in names if n.startswith(("cli/", "queries/", "tests/"))]
    # every module of the source tree is in the wheel (pyproject lists the packages by name)
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "raydiff").rglob("*.py")}
    assert source <= set(names), sorted(source - set(names))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import raydiff, raydiff.cli.main, tempfile; from raydiff.query.views import sql_files, connect;"
            "assert raydiff.__file__.startswith(%r), raydiff.__file__;"
            "assert [n for n, _ in sql_files()] == %r;"
            "connect(tempfile.mkdtemp()).execute('SELECT * FROM runs').fetchall()") % (
        str(site), sorted(p.name for p in (ROOT / "queries").glob("*.sql")))
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
