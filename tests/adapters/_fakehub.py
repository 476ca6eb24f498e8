"""A minimal Hugging Face Hub on 127.0.0.1: the endpoints ``huggingface_hub`` 2.x calls to push and pull a repo.

Served (model repos ``namespace/name`` only, every file a regular git blob, never LFS or Xet):

* ``POST /api/repos/create``: 200 with the repo URL, 409 (with the URL) when it exists.
* ``POST /api/models/{repo}/branch/{branch}``: a branch from ``main`` (409 when it exists).
* ``POST /api/models/{repo}/preupload/{rev}``: every file ``"regular"``, with the oid it has on the branch.
* ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (``file`` base64 / ``deletedFile`` lines);
  ``create_pr=1`` commits to a new ``refs/pr/N``.
* ``POST /api/models/{repo}/discussions`` and ``GET .../discussions/{n}``: a pull request (``refs/pr/n``).
* ``POST /api/validate-yaml``: accepts any card.
* ``GET /api/models/{repo}[/revision/{rev}]``: id, commit ``sha``, ``siblings``.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the files (``recursive`` or not).
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file with ``X-Repo-Commit``, ``ETag`` (the git blob sha)
  and ``Content-Length``; errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) as the Hub's do.

Every request is recorded in :attr:`FakeHub.requests` as ``(method, path)``, so a test can count them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def repo(name: str) -> str:
    """The id of a repo on the fake Hub (``org/<name>``); no test names a repo of the real Hub."""
    return f"org/{name}"


def blob_oid(content: bytes) -> str:
    """The git blob sha1 of ``content`` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """One model repo: branches (and PR refs) -> commit sha, commit sha -> ``{path: content}``."""

    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    private: bool = False
    prs: int = 0


class FakeHub:
    """The server; ``with FakeHub() as hub: hub.endpoint`` is its URL (``http://127.0.0.1:PORT``)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit_sha(self) -> str:
        with self._lock:
            self._counter += 1
            return hashlib.sha1(f"commit {self._counter}".encode()).hexdigest()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch or a commit sha)."""
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # ---- replies ---------------------------------------------------------------------------------
        def _send(
            self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False
        ) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            self._send(
                status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
            )

        def _error(self, status: int, code: str, message: str, *, head: bool = False, **extra: str) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, body, {**headers, **extra}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        # ---- lookups ---------------------------------------------------------------------------------
        def _repo(self, repo_id: str, *, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head=head)
            return repo

        def _commit(self, repo: Repo, revision: str, *, head: bool = False) -> str | None:
            sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
            return sha

        # ---- methods ---------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            hub.requests.append((method, url.path))
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            try:
                if parts[:1] == ["api"]:
                    self._api(method, parts[1:], query)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                else:
                    self._error(404, "NotFound", f"no route for {method} {url.path}")
            except Exception as e:  # a bug of the fake must show up in the test, not hang it
                self._error(500, "FakeHubError", repr(e))

        def _api(self, method: str, parts: list[str], query: dict[str, str]) -> None:
            if method == "POST" and parts == ["repos", "create"]:
                payload = json.loads(self._body())
                repo_id = f"{payload['organization']}/{payload['name']}"
                if repo_id in hub.repos:
                    # the Hub's 409 carries the URL too: create_repo(exist_ok=True) returns it
                    message = "You already created this model repo"
                    body = json.dumps({"error": message, "url": f"{hub.endpoint}/{repo_id}"}).encode()
                    self._send(409, body, {"Content-Type": "application/json", "X-Error-Message": message})
                    return
                sha = hub.commit_sha()
                hub.repos[repo_id] = Repo(
                    refs={"main": sha},
                    commits={sha: {}},
                    private=payload.get("visibility") == "private",
                )
                self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                return
            if method == "POST" and parts == ["validate-yaml"]:
                self._body()
                self._json(200, {"warnings": [], "errors": []})
                return
            if len(parts) < 3 or parts[0] != "models":
                self._error(404, "NotFound", "unknown api route")
                return
            repo_id, rest = f"{parts[1]}/{parts[2]}", parts[3:]
            body = self._body() if method == "POST" else b""
            repo = self._repo(repo_id)
            if repo is None:
                return
            if method == "GET" and (not rest or rest[0] == "revision"):
                sha = self._commit(repo, "/".join(rest[1:]) if rest else "main")
                if sha is not None:
                    siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
                    self._json(
                        200, {"id": repo_id, "sha": sha, "siblings": siblings, "private": repo.private}
                    )
                return
            if method == "GET" and rest[:1] == ["tree"]:
                sha = self._commit(repo, rest[1])
                if sha is None:
                    return
                prefix = "/".join(rest[2:])
                recursive = query.get("recursive", "False").lower() == "true"
                entries = []
                for path, content in sorted(repo.commits[sha].items()):
                    inner = path[len(prefix) + 1 :] if prefix else path
                    if prefix and not path.startswith(prefix + "/"):
                        continue
                    if recursive or "/" not in inner:
                        entries.append(
                            {"type": "file", "path": path, "size": len(content), "oid": blob_oid(content)}
                        )
                self._json(200, entries)
                return
            if method == "POST" and rest[:1] == ["branch"]:
                branch = "/".join(rest[1:])
                if branch in repo.refs:
                    self._error(409, "BranchExists", "Reference already exists")
                    return
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                sha = self._commit(repo, start)
                if sha is not None:
                    repo.refs[branch] = sha
                    self._json(200, {})
                return
            if method == "POST" and rest[:1] == ["preupload"]:
                sha = self._commit(repo, "/".join(rest[1:]))
                if sha is None:
                    return
                files = repo.commits[sha]
                out = []
                for f in json.loads(body)["files"]:
                    old = files.get(f["path"])
                    out.append(
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": blob_oid(old) if old is not None else None,
                        }
                    )
                self._json(200, {"files": out, "commitOid": sha})
                return
            if method == "POST" and rest == ["discussions"]:
                # create_pull_request: a refs/pr/N branch from main, committed to next
                repo.prs += 1
                repo.refs[f"refs/pr/{repo.prs}"] = repo.refs["main"]
                self._json(200, {"num": repo.prs})
                return
            if method == "GET" and rest[:1] == ["discussions"] and len(rest) == 2:
                self._json(
                    200,
                    {
                        "title": "pull request",
                        "num": int(rest[1]),
                        "author": {"name": "fake"},
                        "createdAt": "2026-01-01T00:00:00.000Z",
                        "status": "open",
                        "repo": {"name": repo_id, "type": "model"},
                        "isPullRequest": True,
                        "events": [],
                        "changes": {"base": "main"},
                        "filesWithConflicts": [],
                    },
                )
                return
            if method == "POST" and rest[:1] == ["commit"]:
                self._commit_ndjson(repo_id, repo, "/".join(rest[1:]), body, query.get("create_pr") == "1")
                return
            self._error(404, "NotFound", "unknown api route")

        def _commit_ndjson(
            self, repo_id: str, repo: Repo, revision: str, body: bytes, create_pr: bool
        ) -> None:
            parent = self._commit(repo, revision)
            if parent is None:
                return
            files = dict(repo.commits[parent])
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                elif item["key"] == "deletedFolder":
                    folder = item["value"]["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(folder)}
                elif item["key"] != "header":
                    self._error(400, "BadRequest", f"the fake hub takes no {item['key']} lines")
                    return
            sha = hub.commit_sha()
            repo.commits[sha] = files
            pr_url = None
            if create_pr:
                repo.prs += 1
                repo.refs[f"refs/pr/{repo.prs}"] = sha
                pr_url = f"{hub.endpoint}/{repo_id}/discussions/{repo.prs}"
            else:
                repo.refs[revision] = sha
            self._json(
                200,
                {
                    "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": pr_url,
                },
            )

        def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
            head = method == "HEAD"
            repo = self._repo(repo_id, head=head)
            if repo is None:
                return
            sha = self._commit(repo, revision, head=head)
            if sha is None:
                return
            content = repo.commits[sha].get(path)
            if content is None:
                self._error(404, "EntryNotFound", "Entry not found", head=head, **{"X-Repo-Commit": sha})
                return
            headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_oid(content)}"'}
            self._send(200, content, {"Content-Type": "application/octet-stream", **headers}, head=head)

    return Handler


def point_hub_at(monkeypatch: Any, hub: FakeHub) -> None:
    """Send every ``huggingface_hub`` request of the test to ``hub``, online (whatever ``HF_HUB_OFFLINE`` says in
    the environment), with no token read from the user's files."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
