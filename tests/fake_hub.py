"""A Hugging Face Hub on 127.0.0.1 for tests: the endpoints the real ``huggingface_hub`` calls.

Repos live in memory as commits (file name → bytes) with branches and tags; ``publish``
adds a commit while the server runs. Two servers share the state: the Hub itself and a
"CDN" on another port that LFS downloads are redirected to, as on huggingface.co, so the
client's rule of not sending the token off the Hub is exercised too.

Served (``{repo}`` is ``org/name``, ``{rev}`` a branch, tag or sha, URL-quoted):

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` — model info
  (``id``, ``sha``, ``siblings``…); what ``model_info`` and ``snapshot_download`` call;
- ``GET /api/models/{repo}/refs`` — branches and tags (``list_repo_refs``);
- ``GET /api/models/{repo}/tree/{rev}`` — the file listing ``snapshot_download`` fetches
  (``list_repo_tree``; ``oid``, ``size``, ``lfs`` for ``*.safetensors``);
- ``GET /api/models?author=…&search=…`` — ``list_models``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` — ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``; LFS files answer ``302`` to the CDN with ``X-Linked-Etag`` (sha256)
  and ``X-Linked-Size``, like the real Hub;
- ``HEAD``/``GET /cdn/{sha256}`` on the CDN port — the bytes, with ``Range`` support
  (``drop_once`` breaks the next body over 1 KiB of that blob off halfway, whole file or
  range).

Errors carry the ``X-Error-Code`` headers ``huggingface_hub`` maps to its exceptions:
``RepoNotFound`` (401 for a private repo without the right token, 404 for an unknown one),
``GatedRepo`` (403 on downloads of a gated repo), ``RevisionNotFound``, ``EntryNotFound``.
``fail`` makes chosen paths answer 503 (the Hub down).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


#: The token every worker of the tests' shared Ray cluster holds (see conftest.py).
WORKER_TOKEN = "hf_WorkerTokenOfTheSessionCluster0123"


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def sha_of(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (as ``write_checkpoint`` left them), by relative path."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class FakeHub:
    """Start with ``with FakeHub(token) as hub:``; ``hub.url`` is the HF_ENDPOINT to use."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 → bytes (the CDN's content)
        self.log: list[tuple[str, str, str, bool, str | None]] = []  # (server, method, path, had a token, Range)
        self.failing: set[str] = set()  # path prefixes answering 503
        self.drop_once: set[str] = set()  # sha256 of blobs whose next download breaks off near its end
        self._lock = threading.Lock()
        self._counter = 0
        self._hub = self._server("hub")
        self._cdn = self._server("cdn")
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # -- state --------------------------------------------------------------------------------

    def publish(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
                tags: tuple[str, ...] = (), private: bool = False, gated: bool = False) -> str:
        """Commit ``files`` (the whole tree) on ``branch`` of ``repo_id``; returns the sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
            self._counter += 1
            tree = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", **files}
            sha = hashlib.sha1(f"{repo_id}\0{self._counter}\0{sorted(tree)}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            for tag in tags:
                repo.tags[tag] = sha
            for name, data in tree.items():
                if _is_lfs(name):
                    self.blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def fail(self, prefix: str) -> None:
        """Answer 503 to every request whose path starts with ``prefix`` (``""``: the whole Hub)."""
        self.failing.add(prefix)

    def heal(self) -> None:
        self.failing.clear()

    def requests(self, server: str = "hub") -> list[tuple[str, str, bool, str | None]]:
        """``(method, path, had a token, Range header)`` of every request the server got."""
        return [(m, p, t, r) for s, m, p, t, r in self.log if s == server]

    # -- servers ------------------------------------------------------------------------------

    def _server(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            fake = hub
            server_role = role

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server

    def __enter__(self) -> FakeHub:
        for s in (self._hub, self._cdn):
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree|refs)(?:/(?P<rev>[^/]+))?(?:/(?P<sub>.*))?)?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub
    server_role: str

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    # -- plumbing -----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj: object, head: bool, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.fake.token}"

    def _handle(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        fake = self.fake
        fake.log.append((self.server_role, self.command, self.path, bool(self.headers.get("Authorization")),
                         self.headers.get("Range")))
        if self.server_role == "cdn":
            return self._cdn(path, head)
        if any(path.startswith(p) for p in fake.failing):
            return self._error(503, None, "Service Unavailable", head)
        if path == "/api/models":
            return self._list_models(parse_qs(url.query), head)
        m = _API_REPO.match(path)
        if m:
            return self._api(m, head)
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]), head)
        self._error(404, None, f"no route {path}", head)

    def _repo(self, repo_id: str, head: bool) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # the real Hub answers 401 to an unauthenticated request for a private (or absent) repo
            status = 404 if self._authorized() else 401
            self._error(status, "RepoNotFound", "Repository not found", head)
            return None
        return repo

    # -- the API --------------------------------------------------------------------------------

    def _list_models(self, query: dict[str, list[str]], head: bool) -> None:
        author = query.get("author", [None])[0]
        search = query.get("search", [""])[0]
        out = []
        for repo in self.fake.repos.values():
            org, name = repo.repo_id.split("/")
            if (author and org != author) or search.lower() not in name.lower():
                continue
            if repo.private and not self._authorized():
                continue
            out.append({"id": repo.repo_id, "author": org, "private": repo.private,
                        "sha": repo.branches.get("main")})
        self._json(out, head)

    def _api(self, m: re.Match, head: bool) -> None:
        repo = self._repo(unquote(m["repo"]), head)
        if repo is None:
            return
        kind = m["kind"]
        if kind == "refs":
            ref = lambda kind_, name, sha: {"name": name, "ref": f"refs/{kind_}/{name}", "targetCommit": sha}  # noqa: E731
            return self._json({"branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
                               "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
                               "converts": [], "pullRequests": []}, head)
        rev = unquote(m["rev"]) if m["rev"] else "main"
        sha = repo.sha_of(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        files = repo.commits[sha]
        if kind == "tree":
            prefix = unquote(m["sub"] or "")
            entries = []
            for name, data in sorted(files.items()):
                if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                    continue
                e = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": name}
                if _is_lfs(name):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._json(entries, head)
        self._json({"id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": sha, "private": repo.private,
                    "gated": "auto" if repo.gated else False, "disabled": False, "tags": [],
                    "siblings": [{"rfilename": n} for n in sorted(files)]}, head)

    # -- files ----------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        sha = repo.sha_of(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if repo.gated and not self._authorized():
            return self._error(403, "GatedRepo", "Access to this model is restricted", head)
        data = repo.commits[sha].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head, {"X-Repo-Commit": sha})
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if _is_lfs(name):
            digest = hashlib.sha256(data).hexdigest()
            location = f"{self.fake.cdn_url}/cdn/{digest}?name={quote(name)}"
            return self._send(302, b"", {**common, "Location": location, "X-Linked-Etag": f'"{digest}"',
                                         "X-Linked-Size": str(len(data)), "ETag": f'"{_git_blob_sha1(data)}"'}, head)
        self._send(200, data, {**common, "ETag": f'"{_git_blob_sha1(data)}"',
                               "Content-Type": "application/octet-stream"}, head)

    def _cdn(self, path: str, head: bool) -> None:
        m = re.match(r"^/cdn/([0-9a-f]{64})$", path)
        data = self.fake.blobs.get(m[1]) if m else None
        if data is None:
            return self._send(404, b"not found", head=head)
        headers = {"ETag": f'"{m[1]}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, start, stop = 200, 0, len(data)
        rng = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if rng:
            start = int(rng[1])
            stop = min(int(rng[2]) + 1 if rng[2] else len(data), len(data))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        body = data[start:stop]
        if m[1] in self.fake.drop_once and not head and len(body) > 1024:  # a connection lost mid-body
            self.fake.drop_once.discard(m[1])
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers, head)
