"""On object storage every file touched is a request: opening a store and asking about two
runs must cost requests set by those two runs, not by how many the store holds.

A local S3 server (moto) behind a WSGI middleware counts every request raydiff makes, by
kind: LIST, HEAD, GET (and writes). The same store is measured holding 2 runs and then 2 + 10
(complete runs cloned under new ids).
"""

from __future__ import annotations

import threading
from collections import Counter
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch

from builders import clone_run, perturb, ref_diff, write_checkpoint
from raydiff.kernel.masks import decode_mask
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.query.views import connect, query
from raydiff.run.submit import submit
from raydiff.store import Store
from raydiff.store.catalog import Catalog

pytestmark = pytest.mark.usefixtures("ray_cluster")


class CountingS3:
    """moto's S3 on 127.0.0.1, every request recorded as (kind, path)."""

    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()

        def counting(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            query = parse_qs(environ.get("QUERY_STRING", ""))
            if method == "GET" and ("list-type" in query or "prefix" in query or path.count("/") <= 2
                                    and not query.get("uploadId")):
                kind = "LIST"
            else:
                kind = {"GET": "GET", "HEAD": "HEAD"}.get(method, "WRITE")
            with self._lock:
                self.log.append((kind, path))
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        host, port = self.server.server_address[:2]
        self.root = (f"s3://k:s@raydiff-req/store?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
                     "&allow_bucket_creation=true")

    def count(self, fn) -> Counter:
        start = len(self.log)
        fn()
        return Counter(kind for kind, _ in self.log[start:])

    def stop(self) -> None:
        self.server.shutdown()


def test_requests_depend_on_the_runs_touched_not_on_the_runs_stored(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(96, 64, generator=g).bfloat16() for i in range(3)}
    tuned = [{k: perturb(v, d, 1e-2, 7 * i + j) for j, (k, v) in enumerate(base.items())}
             for i, d in enumerate((0.2, 0.1))]
    b = write_checkpoint(tmp_path / "base", base, shards=2)
    ts = [write_checkpoint(tmp_path / f"t{i}", t) for i, t in enumerate(tuned)]
    s3 = CountingS3()
    try:
        store = Store(s3.root)
        store.fs.create_dir("raydiff-req")
        opts = lambda name: SubmitOptions(store=s3.root, name=name,  # noqa: E731
                                          diff=DiffOptions(chunk_elems=2048, rank="off"))
        ra = submit(str(b), str(ts[0]), opts("a"))
        rb = submit(str(b), str(ts[1]), opts("b"))

        def ask() -> None:
            con = connect(s3.root)
            try:
                (row,) = con.execute("SELECT numel, changed_a, changed_b, changed_both FROM overlap_total('a', 'b')"
                                     ).fetchall()
                ask.result = row
                con.execute("SELECT count(*) FROM tensors WHERE run_id = run_ref('b')").fetchall()
            finally:
                con.close()

        def fold() -> None:  # what the 16th append does by itself
            Catalog(store).runs.fold(force=True)
            Catalog(store).commits.fold(force=True)

        fold()
        small = s3.count(ask)
        expected = ask.result
        for i in range(10):
            clone_run(store, ra.run_id if i % 2 else rb.run_id, f"{i:020x}", name=f"clone{i}")
        fold()
        large = s3.count(ask)
        assert large == small, (small, large)
        assert ask.result == expected
        assert small["LIST"] <= 5 and small["GET"] + small["HEAD"] <= 40, small  # a handful, not one per file
        # and the answer is the masks' own: a numpy AND of the decoded masks
        _, rows = query(s3.root, "SELECT run_id, tensor, \"start\", \"stop\", mask_codec, mask FROM masks "
                                 "WHERE run_id IN (?, ?) ORDER BY tensor, \"start\"", [ra.run_id, rb.run_id])
        m = {r: np.concatenate([decode_mask(c, x, e - s) for rid, _, s, e, c, x in rows if rid == r])
             for r in (ra.run_id, rb.run_id)}
        assert expected == (m[ra.run_id].size, int(m[ra.run_id].sum()), int(m[rb.run_id].sum()),
                            int((m[ra.run_id] & m[rb.run_id]).sum()))
        assert expected[1] == sum(ref_diff(base[k], tuned[0][k])["changed"] for k in base)
    finally:
        s3.stop()
