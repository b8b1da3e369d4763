"""An in-memory fake of the Hugging Face Hub HTTP API, served on loopback, for real `push_to_hub` round trips.

It speaks the subset of the Hub API that `huggingface_hub` 1.x/2.x and transformers use to push a checkpoint and to
download it again (see `FakeHub.handled_routes`): repo creation, preupload (always answering `uploadMode: "regular"`,
so file contents travel base64-encoded inside the NDJSON commit and no LFS / Xet transfer is ever attempted), commits,
README metadata validation, model info, tree / paths-info listings, refs and branches, `resolve` downloads (HEAD and
GET, with the `ETag` / `X-Repo-Commit` headers that `hf_hub_download` requires and the `X-Error-Code` headers it turns
into `RepositoryNotFoundError` / `RevisionNotFoundError` / `EntryNotFoundError`), `whoami-v2` and the agent-harness
registry. Write endpoints require an `Authorization: Bearer <token>` header with a token the hub knows (401
otherwise). Every request is logged in `FakeHub.requests`; requests to routes the fake does not know are answered 404
and also collected in `FakeHub.unhandled`, so a test can assert that nothing unexpected was called.

Storage is `{repo_id: {revision: {path: bytes}}}` in spirit: each repo keeps its commits (`sha -> {path: bytes}`, a
full snapshot per commit) and its branch heads (`revision -> sha`); a commit sha is the sha1 of the parent sha, the
message and the files' git blob ids.

Why the client runs in a subprocess: `huggingface_hub` reads `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME` and the token
path into module constants at import time, and transformers keeps its own offline flag and `hf_api` instance; the test
process has already imported both with `HF_HUB_OFFLINE=1` (tests/conftest.py). Patching all those copies in-process
would be fragile and would leak into other tests, so the client code of a push test runs in a fresh interpreter
(`start_client` / `run_client`) whose environment (`client_env`) points `HF_ENDPOINT` at this server, sets the fake
token (or none) and a private `HF_HOME`, and strips every other `HF_*` variable. The server keeps running in a thread
of the pytest process, where the test then inspects what arrived.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

FAKE_TOKEN = "hf_fake_write_token"
FAKE_USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub uses as ETag / oid of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> full snapshot
    messages: dict[str, str] = field(default_factory=dict)  # sha -> summary
    branches: dict[str, str] = field(default_factory=dict)  # name (incl. refs/pr/N) -> sha
    pull_requests: int = 0

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        matches = [sha for sha in self.commits if len(revision) >= 7 and sha.startswith(revision)]
        return matches[0] if len(matches) == 1 else None

    def commit(self, parent: str | None, files: dict[str, bytes], message: str) -> str:
        digest = hashlib.sha1((parent or "").encode() + b"\0" + message.encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_id(files[path])}".encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.messages[sha] = message
        return sha


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class RequestRecord:
    method: str
    path: str
    authorized: bool
    status: int = 0


class FakeHub:
    """A fake Hub on `http://127.0.0.1:<free port>`; use as a context manager or call `start()` / `stop()`.

    Args:
        tokens: Bearer tokens accepted for writes (and for reading private repos).
        user: Name `whoami-v2` returns; repos created without an organization land in this namespace.
    """

    handled_routes = (
        "POST /api/repos/create",
        "POST /api/models/{repo}/preupload/{rev}",
        "POST /api/models/{repo}/commit/{rev}",
        "POST /api/models/{repo}/branch/{branch}",
        "POST /api/models/{repo}/paths-info/{rev}",
        "POST /api/validate-yaml",
        "GET /api/models/{repo}[/revision/{rev}]",
        "GET /api/models/{repo}/tree/{rev}[/{path}]",
        "GET /api/models/{repo}/refs",
        "HEAD|GET /{repo}/resolve/{rev}/{path}",
        "GET /api/whoami-v2",
        "GET /api/agent-harnesses",
    )

    def __init__(self, tokens: tuple[str, ...] = (FAKE_TOKEN,), user: str = FAKE_USER) -> None:
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[str, _Repo] = {}
        self.requests: list[RequestRecord] = []
        self.unhandled: list[str] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection -----------------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (branch name or commit sha); KeyError when either is unknown."""
        with self._lock:
            repo = self.repos[repo_id]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return dict(repo.commits[sha])

    def head(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].branches[revision]

    def commit_messages(self, repo_id: str) -> list[str]:
        with self._lock:
            return list(self.repos[repo_id].messages.values())

    def write_requests(self) -> list[RequestRecord]:
        """Requests that would change state (every POST and the other non-read methods)."""
        return [record for record in self.requests if record.method not in ("GET", "HEAD")]

    # -- API ------------------------------------------------------------------------------------------------------
    def _token(self, headers: Any) -> str | None:
        value = headers.get("Authorization") or ""
        return value[len("Bearer ") :].strip() if value.startswith("Bearer ") else None

    def _require_write(self, token: str | None) -> None:
        if token is None:
            raise _HubError(401, "Invalid username or password.", headers={"X-Error-Message": "Invalid username"})
        if token not in self.tokens:
            raise _HubError(
                401,
                "Invalid credentials in Authorization header",
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )

    def _repo(self, repo_id: str, token: str | None) -> _Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in self.tokens):
            # What the Hub answers for a missing (or hidden) repo: 401 + RepoNotFound.
            raise _HubError(401, "Repository not found", "RepoNotFound", {"X-Error-Message": "Repository not found"})
        return repo

    def _revision(self, repo: _Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Any:
        """Dispatches one request; returns a JSON-able value or a `(status, headers, bytes)` tuple."""
        token = self._token(headers)
        parts = [unquote(part) for part in path.strip("/").split("/")]
        with self._lock:
            if method == "GET" and path == "/api/agent-harnesses":
                return {"standardEnvVars": [], "harnesses": {}}
            if method == "GET" and path == "/api/whoami-v2":
                self._require_write(token)
                return {
                    "type": "user",
                    "id": "0" * 24,
                    "name": self.user,
                    "fullname": "Fake Hub Tester",
                    "isPro": False,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
                }
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body or b"{}"))
            if method == "POST" and path == "/api/repos/create":
                self._require_write(token)
                return self._create_repo(json.loads(body or b"{}"))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                return self._model_api(method, parts[2:], query, token, headers, body)
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), token, headers)
        raise _HubError(404, f"fake hub: no route for {method} {path}", headers={"X-Fake-Hub": "unhandled"})

    def _validate_yaml(self, payload: dict[str, Any]) -> Any:
        content = payload.get("content") or ""
        if content.startswith("---"):
            front_matter = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                metadata = yaml.safe_load(front_matter)
            except yaml.YAMLError as error:
                return 400, {}, json.dumps({"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []})
            if metadata is not None and not isinstance(metadata, dict):
                return 400, {}, json.dumps({"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return {"errors": [], "warnings": []}

    def _create_repo(self, payload: dict[str, Any]) -> Any:
        if payload.get("type") not in (None, "model"):
            raise _HubError(400, f"the fake hub only hosts model repos, not {payload.get('type')!r}")
        name = payload.get("name") or ""
        repo_id = f"{payload.get('organization') or self.user}/{name}"
        url = f"{self._base_url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {}, json.dumps({"error": "You already created this model repo", "url": url})
        repo = _Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.branches["main"] = repo.commit(None, {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _model_api(
        self, method: str, parts: list[str], query: dict[str, list[str]], token: str | None, headers: Any, body: bytes
    ) -> Any:
        repo_id, action, rest = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else None), parts[3:]
        if method == "POST" and action != "paths-info":
            self._require_write(token)
        repo = self._repo(repo_id, token)
        if method == "GET" and action is None:
            return self._model_info(repo, "main")
        if method == "GET" and action == "revision" and rest:
            return self._model_info(repo, "/".join(rest))
        if method == "GET" and action == "refs":
            return {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in repo.branches.items()
                    if not name.startswith("refs/")
                ],
                "converts": [],
                "tags": [],
            }
        if method == "GET" and action == "tree" and rest:
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            return self._tree(repo, rest[0], "/".join(rest[1:]), recursive)
        if method == "POST" and action == "paths-info" and rest:
            form = parse_qs(body.decode())
            files = repo.commits[self._revision(repo, rest[0])]
            wanted = form.get("paths", [])
            return [entry for entry in self._entries(files, "", True) if entry["path"] in wanted]
        if method == "POST" and action == "preupload" and rest:
            files = repo.commits[self._revision(repo, "/".join(rest))]
            payload = json.loads(body or b"{}")
            return {
                "files": [
                    {
                        "path": item["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_id(files[item["path"]]) if item["path"] in files else None,
                    }
                    for item in payload.get("files", [])
                ],
                "commitOid": repo.branches.get("/".join(rest)),
            }
        if method == "POST" and action == "commit" and rest:
            create_pr = (query.get("create_pr") or ["0"])[0] in ("1", "true")
            return self._commit(repo, "/".join(rest), body, create_pr)
        if method == "POST" and action == "branch" and rest:
            branch = "/".join(rest)
            if branch in repo.branches:
                return 409, {}, json.dumps({"error": f"Reference already exists: refs/heads/{branch}"})
            payload = json.loads(body or b"{}")
            repo.branches[branch] = self._revision(repo, payload.get("startingPoint") or "main")
            return {}
        raise _HubError(
            404, f"fake hub: no route for {method} /api/models/{'/'.join(parts)}", headers={"X-Fake-Hub": "unhandled"}
        )

    def _model_info(self, repo: _Repo, revision: str) -> Any:
        sha = self._revision(repo, revision)
        files = repo.commits[sha]
        card_data = None
        readme = files.get("README.md", b"").decode("utf-8", "replace")
        if readme.startswith("---") and readme.count("---") >= 2:
            with contextlib.suppress(yaml.YAMLError):
                card_data = yaml.safe_load(readme.split("---", 2)[1])
        card_data = card_data if isinstance(card_data, dict) else None
        config = None
        if "config.json" in files:
            with contextlib.suppress(ValueError):
                config = json.loads(files["config.json"])
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card_data or {}).get("tags") or []),
            "pipeline_tag": (card_data or {}).get("pipeline_tag"),
            "library_name": (card_data or {}).get("library_name"),
            "cardData": card_data,
            "config": config,
            "lastModified": datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z"),
            "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path, "size": len(data)} for path, data in sorted(files.items())],
        }

    @staticmethod
    def _entries(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix) :].split("/")
            for depth in range(1, len(relative)):
                directory = prefix + "/".join(relative[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        directory,
                        {"type": "directory", "oid": hashlib.sha1(directory.encode()).hexdigest(), "path": directory},
                    )
            if recursive or len(relative) == 1:
                entries[path] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
        return list(entries.values())

    def _tree(self, repo: _Repo, revision: str, folder: str, recursive: bool) -> Any:
        files = repo.commits[self._revision(repo, revision)]
        if folder and not any(path.startswith(folder.strip("/") + "/") for path in files):
            raise _HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        return self._entries(files, folder, recursive)

    def _commit(self, repo: _Repo, revision: str, body: bytes, create_pr: bool) -> Any:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        base = self._revision(repo, revision)
        parent = header.get("parentCommit")
        if parent and not create_pr and repo.resolve(parent) != base:
            raise _HubError(412, f"parent commit {parent} is not the head of {revision}")
        files = dict(repo.commits[repo.resolve(parent) if parent and create_pr else base])
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                content = value.get("content", "")
                files[path] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode("utf-8")
                )
            elif key == "deletedFile":
                if path not in files:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {name: data for name, data in files.items() if not name.startswith(prefix)}
            else:
                # "lfsFile" cannot happen (preupload always answers "regular"); anything else is unknown.
                raise _HubError(400, f"fake hub: unsupported commit operation {key!r}")
        message = header.get("summary") or ""
        if header.get("description"):
            message += "\n\n" + header["description"]
        sha = repo.commit(base, files, message)
        pr_url = None
        if create_pr:
            repo.pull_requests += 1
            branch = f"refs/pr/{repo.pull_requests}"
            pr_url = f"{self._base_url}/{repo.repo_id}/discussions/{repo.pull_requests}"
        else:
            branch = revision
        repo.branches[branch] = sha
        return {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self._base_url}/{repo.repo_id}/commit/{sha}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        }

    def _resolve(self, method: str, repo_id: str, revision: str, path: str, token: str | None, headers: Any) -> Any:
        repo = self._repo(repo_id, token)
        sha = self._revision(repo, revision)
        files = repo.commits[sha]
        if path not in files:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        response_headers = {
            "ETag": f'"{git_blob_id(data)}"',
            "X-Repo-Commit": sha,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        status = 200
        byte_range = headers.get("Range") or ""
        if byte_range.startswith("bytes="):
            start_text, _, end_text = byte_range[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(data) - 1
            response_headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return status, response_headers, data

    @property
    def _base_url(self) -> str:
        return self.url


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        hub = self.fake_hub
        split = urlsplit(self.path)
        body = self._body()
        record = RequestRecord(self.command, split.path, hub._token(self.headers) is not None)
        with hub._lock:
            hub.requests.append(record)
        try:
            result = hub.handle(self.command, split.path, parse_qs(split.query), self.headers, body)
        except _HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers.setdefault("X-Error-Message", error.message)
            if headers.get("X-Fake-Hub") == "unhandled":
                with hub._lock:
                    hub.unhandled.append(f"{self.command} {self.path}")
            result = (error.status, headers, json.dumps({"error": error.message}).encode())
        except Exception as error:  # a bug in the fake: answer 500 rather than hanging the client
            result = (500, {}, json.dumps({"error": f"fake hub crashed: {error!r}"}).encode())
        if isinstance(result, tuple):
            status, headers, payload = result
            payload = payload.encode() if isinstance(payload, str) else payload
            headers = {"Content-Type": "application/json", **headers}
        else:
            status, headers, payload = 200, {"Content-Type": "application/json"}, json.dumps(result).encode()
        record.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815 - http.server's naming


# -- running client code against the fake hub ------------------------------------------------------------------------
def client_env(hub: FakeHub, hf_home: str | os.PathLike, token: str | None = FAKE_TOKEN) -> dict[str, str]:
    """An environment for a client subprocess: Hub calls go to `hub`, caches to `hf_home`, `HF_TOKEN=token`.

    Every inherited `HF_*` / `HUGGING_FACE_*` variable is dropped first (offline flag, tokens, OIDC, cache paths).
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGING_FACE_", "HUGGINGFACE_", "TRANSFORMERS_"))
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="30",
        HF_HUB_DOWNLOAD_TIMEOUT="30",
        TOKENIZERS_PARALLELISM="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(proxy, None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


class ClientProcess:
    """Python source running in a fresh interpreter; its stdout / stderr go to files (no pipe can fill up)."""

    def __init__(
        self, code: str, env: dict[str, str], *args: str, cwd: str | os.PathLike, log_dir: str | os.PathLike
    ) -> None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self._stdout_path, self._stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self._stdout_path, "wb") as stdout, open(self._stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, *args], env=env, cwd=str(cwd), stdout=stdout, stderr=stderr
            )

    def wait(self, timeout: float = 180) -> subprocess.CompletedProcess:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return subprocess.CompletedProcess(
            self.process.args,
            returncode,
            self._stdout_path.read_text(errors="replace"),
            self._stderr_path.read_text(errors="replace"),
        )


def start_client(
    code: str, env: dict[str, str], *args: str, cwd: str | os.PathLike, log_dir: str | os.PathLike
) -> ClientProcess:
    """Starts `code` (Python source) in a fresh interpreter with `env`; `args` become `sys.argv[1:]`.

    Several clients can run at once (e.g. a push without a token beside a push with one); `wait()` collects them.
    """
    return ClientProcess(code, env, *args, cwd=cwd, log_dir=log_dir)


def run_client(
    code: str,
    env: dict[str, str],
    *args: str,
    cwd: str | os.PathLike,
    log_dir: str | os.PathLike,
    timeout: float = 180,
) -> subprocess.CompletedProcess:
    """`start_client(...).wait()`."""
    return start_client(code, env, *args, cwd=cwd, log_dir=log_dir).wait(timeout)


__all__ = [
    "FAKE_TOKEN",
    "FAKE_USER",
    "ClientProcess",
    "FakeHub",
    "client_env",
    "git_blob_id",
    "run_client",
    "start_client",
]
