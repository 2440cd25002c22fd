"""`--format json` and `--format csv` are lossless; `table` rounds for the eye only.

Each value goes through DuckDB into the CLI's renderer and is read back with the standard
library's ``json`` and ``csv``; the expected values are what DuckDB's own Python API returns
for the same query (``fetchall``), an independent conversion.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
import json
import math
import struct

import duckdb
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from raydiff.cli.main import app
from raydiff.cli.render import render

_SPELLED = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _table(sql: str, params: list | None = None) -> tuple[pa.Table, list[tuple]]:
    con = duckdb.connect()
    return con.sql(sql, params=params).to_arrow_table(), con.execute(sql, params or []).fetchall()


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))


_doubles = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1 / 3, 0.9999991, 5e-324, -0.0, 1.7976931348623157e308, 2.0 ** -1074, 0.1 + 0.2])


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(_doubles, min_size=1, max_size=8))
def test_every_double_round_trips_exactly(xs):
    table, rows = _table("SELECT unnest(?::DOUBLE[]) AS x", [xs])
    got_json = [r["x"] for r in json.loads(render(table, "json"))]
    got_json = [_SPELLED[v] if isinstance(v, str) else v for v in got_json]
    got_csv = [float(r[0]) for r in list(csv.reader(io.StringIO(render(table, "csv"))))[1:]]
    for want, j, c in zip([r[0] for r in rows], got_json, got_csv, strict=True):
        assert isinstance(j, float) and _same_float(j, want) and _same_float(c, want), (want, j, c)


def test_integers_decimals_times_lists_blobs_and_nulls_round_trip():
    sql = """SELECT 170141183460469231731687303715884105727::HUGEINT AS huge, (-9223372036854775807 - 1)::BIGINT AS small,
                    18446744073709551615::UBIGINT AS ubig, sum(x)::HUGEINT AS total, 1.5 AS dec,
                    123456789012345678.123456789::DECIMAL(38, 9) AS wide_dec, 0.1::FLOAT AS single,
                    TIMESTAMPTZ '2025-03-01 12:00:00.123456+00' AS at, DATE '2024-02-29' AS day,
                    [1.0 / 3, NULL, 'nan'::DOUBLE] AS xs, [[1, 2], []] AS nested, {'k': 2, 's': 'x'} AS st,
                    '\\x00\\xff\\x01'::BLOB AS mask, NULL::VARCHAR AS nothing, 'a,"b"\nc ü' AS text, true AS flag
             FROM (SELECT 9223372036854775807::BIGINT AS x UNION ALL SELECT 9223372036854775807)"""
    table, rows = _table(sql)
    (want,) = rows
    names = table.column_names
    (obj,) = json.loads(render(table, "json"))
    assert list(obj) == names
    assert obj["huge"] == 2**127 - 1 and obj["small"] == -(2**63) and obj["ubig"] == 2**64 - 1
    assert obj["total"] == 2 * (2**63 - 1) and isinstance(obj["total"], int)
    assert decimal.Decimal(json.dumps(obj["dec"])) == want[names.index("dec")]
    raw = render(table, "json")
    assert '"wide_dec": 123456789012345678.123456789' in raw  # every digit, as a JSON number
    assert obj["single"] == float(want[names.index("single")])
    assert dt.datetime.fromisoformat(obj["at"]) == want[names.index("at")] and obj["at"].endswith("+00:00")
    assert obj["day"] == "2024-02-29"
    assert obj["xs"][0] == 1 / 3 and obj["xs"][1] is None and obj["xs"][2] == "NaN"
    assert obj["nested"] == [[1, 2], []] and obj["st"] == {"k": 2, "s": "x"}
    assert base64.b64decode(obj["mask"]) == want[names.index("mask")]
    assert obj["nothing"] is None and obj["text"] == 'a,"b"\nc ü' and obj["flag"] is True

    header, row = list(csv.reader(io.StringIO(render(table, "csv"))))
    cells = dict(zip(header, row))
    assert header == names
    assert int(cells["huge"]) == 2**127 - 1 and int(cells["ubig"]) == 2**64 - 1 and int(cells["small"]) == -(2**63)
    assert decimal.Decimal(cells["wide_dec"]) == want[names.index("wide_dec")]
    assert struct.pack("<f", float(cells["single"])) == struct.pack("<f", want[names.index("single")])
    assert dt.datetime.fromisoformat(cells["at"]) == want[names.index("at")]
    assert json.loads(cells["nested"]) == [[1, 2], []] and json.loads(cells["st"]) == {"k": 2, "s": "x"}
    assert base64.b64decode(cells["mask"]) == want[names.index("mask")]
    assert cells["nothing"] == "" and cells["text"] == 'a,"b"\nc ü' and cells["flag"] == "true"


def test_table_rounds_for_the_eye_and_the_cli_writes_each_format(tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "empty-store")
    q = "SELECT 1/3 AS x, 0.9999991::DOUBLE AS s, '\\x01\\x02'::BLOB AS b, [2.0/3] AS l"
    r = runner.invoke(app, ["sql", q, "--store", store, "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"x": 1 / 3, "s": 0.9999991, "b": "AQI=", "l": [2 / 3]}]
    r = runner.invoke(app, ["sql", q, "--store", store, "--format", "csv"])
    assert list(csv.reader(io.StringIO(r.stdout))) == [["x", "s", "b", "l"], [repr(1 / 3), "0.9999991", "AQI=",
                                                                              json.dumps([2 / 3])]]
    r = runner.invoke(app, ["sql", q, "--store", store])
    header, rule, row = r.stdout.splitlines()
    assert header.split() == ["x", "s", "b", "l"] and set(rule.strip()) <= {"─", " "}
    assert row.split() == ["0.333333", "0.999999", "<2", "bytes>", "[0.666667]"]
    r = runner.invoke(app, ["sql", "SELECT 1 WHERE false", "--store", store, "--format", "json"])
    assert r.stdout.strip() == "[]"
    r = runner.invoke(app, ["sql", "SELECT 1", "--store", store, "--format", "yaml"])
    assert r.exit_code == 1 and r.stderr.strip() == "Error: --format must be one of table, csv, json, got 'yaml'"
    assert "lossless" in r.stdout + runner.invoke(app, ["sql", "--help"]).stdout
