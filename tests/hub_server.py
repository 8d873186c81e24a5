"""Loopback stand-in for the Hugging Face Hub HTTP API, limited to model repos.

The server implements the endpoints, headers and JSON shapes that the ``huggingface_hub``
client (checked against version 2.4.0) uses to create model repos, commit files, read
repo metadata and download files. The real client runs against it with
``HF_ENDPOINT=http://127.0.0.1:PORT``. It uses the standard library only.

Run it by hand with::

    python tests/hub_server.py --root /tmp/hub --port 0 --port-file /tmp/hub.port

Storage layout under ``--root``::

    models/<namespace>/<name>/repo.json      branches, commits and the file list of every commit
    models/<namespace>/<name>/blobs/<oid>    file contents, named by their git blob id

Every commit keeps its full file list, so any commit id stays readable as a revision.
The server reloads ``repo.json`` files at start, so restarting it on the same root
keeps the repos.

Not implemented: LFS and Xet uploads and downloads (``preupload`` returns ``regular``
for every file), pull requests, tags, ``.gitignore`` filtering, dataset and Space repos,
and token validation (any ``Authorization: Bearer ...`` value is accepted).

Test control endpoints, which the real Hub does not have:

- ``POST /_control/fail`` with JSON ``{"path_contains": "/commit/", "status": 500,
  "message": "...", "method": "POST", "error_code": null, "times": null}`` makes
  matching requests fail with that status, a JSON ``{"error": message}`` body and an
  ``X-Error-Message`` header. ``method``, ``error_code`` (sent as ``X-Error-Code``) and
  ``times`` (how many requests fail before the rule expires) are optional.
  ``path_contains`` is matched against the request path including its query string.
- ``POST /_control/reset`` removes all failure rules and clears the request log.
- ``GET /_control/requests`` returns the ``[method, path]`` pairs received so far.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger("hub_server")

USER_NAME = "hbll-test"
DEFAULT_BRANCH = "main"

# Shortened version of the .gitattributes file that the Hub adds in the first commit
# of every new model repo. It only marks paths as LFS for git clients. This server
# ignores its content and stores every file as a regular blob.
INITIAL_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

# Names accepted for new repos and namespaces: letters, digits, '-', '_' and '.', without
# a leading or trailing '-' or '.', and at most 96 characters.
REPO_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
BRANCH_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
COMMIT_ID_PATTERN = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """Error response in the Hub's format: JSON ``{"error": ...}`` plus ``X-Error-*`` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        extra_fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra_fields = extra_fields or {}


def repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", "RepoNotFound")


def git_blob_oid(content: bytes) -> str:
    """Return the git blob id (SHA-1 of ``blob <size>\\0<content>``), which the Hub uses as file oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + "000Z"


def validate_path_in_repo(path: str) -> str:
    """Return ``path`` if it is a relative POSIX path without empty, '.' or '..' segments."""
    segments = path.split("/")
    if not path or path.startswith("/") or any(segment in ("", ".", "..") for segment in segments):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class Repo:
    """One model repo: its branches and, for every commit, the full file list."""

    def __init__(self, repo_id: str, directory: Path, state: dict[str, Any]) -> None:
        self.repo_id = repo_id
        self.directory = directory
        self.private: bool = state["private"]
        self.created_at: str = state["createdAt"]
        self.branches: dict[str, str] = state["branches"]
        # commit id -> {"parent", "title", "message", "date", "files": {path: {"oid", "size"}}}
        self.commits: dict[str, dict[str, Any]] = state["commits"]

    def to_state(self) -> dict[str, Any]:
        return {
            "private": self.private,
            "createdAt": self.created_at,
            "branches": self.branches,
            "commits": self.commits,
        }

    def resolve(self, revision: str) -> str:
        """Return the commit id for a branch name or a full commit id."""
        if revision in self.branches:
            return self.branches[revision]
        if COMMIT_ID_PATTERN.match(revision) and revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files_at(self, commit_id: str) -> dict[str, dict[str, Any]]:
        return self.commits[commit_id]["files"]

    def blob_path(self, oid: str) -> Path:
        return self.directory / "blobs" / oid


class HubStore:
    """Repos on disk under ``root``, guarded by one lock for every read and write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.commit_counter = 0
        for state_file in sorted(root.glob("models/*/*/repo.json")):
            repo_id = f"{state_file.parent.parent.name}/{state_file.parent.name}"
            state = json.loads(state_file.read_text())
            self.repos[repo_id] = Repo(repo_id, state_file.parent, state)
        logger.info("Loaded %d repo(s) from %s", len(self.repos), root)

    def get(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise repo_not_found()
        # The Hub returns 401 for private repos read without a token, as a comment in
        # hf_raise_for_status (huggingface_hub 2.4.0, utils/_http.py) states.
        if repo.private and not authorized:
            raise repo_not_found(401)
        return repo

    def create_repo(self, repo_id: str, private: bool) -> tuple[Repo, bool]:
        """Create ``repo_id`` with an initial commit. Return the repo and whether it is new."""
        if repo_id in self.repos:
            return self.repos[repo_id], False
        directory = self.root / "models" / repo_id
        (directory / "blobs").mkdir(parents=True, exist_ok=True)
        state = {"private": private, "createdAt": utc_now_iso(), "branches": {}, "commits": {}}
        repo = Repo(repo_id, directory, state)
        commit_id = self._add_commit(
            repo,
            parent=None,
            files=self._store_blobs(repo, {}, {".gitattributes": INITIAL_GITATTRIBUTES}),
            title="initial commit",
            message="",
        )
        repo.branches[DEFAULT_BRANCH] = commit_id
        self.repos[repo_id] = repo
        self.save(repo)
        return repo, True

    def commit(
        self,
        repo: Repo,
        branch: str,
        header: dict[str, Any],
        added: dict[str, bytes],
        deleted_files: list[str],
        deleted_folders: list[str],
    ) -> str:
        """Apply one commit on top of ``branch`` and return the new commit id."""
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.branches[branch]
        parent_commit = header.get("parentCommit")
        if parent_commit is not None and not head.startswith(str(parent_commit)):
            # NOTE: the status and wording the Hub uses for a stale parent commit were not
            # checked against the real service.
            raise HubError(
                412,
                f"Parent commit {parent_commit} is not the head of branch {branch!r} ({head}). "
                "Refresh the parent commit and retry.",
            )

        files = dict(repo.files_at(head))
        for path in deleted_files:
            if path not in files:
                # huggingface_hub matches this wording to hint at folder deletions.
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            matching = [path for path in files if path.startswith(prefix)]
            if not matching:
                raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            for path in matching:
                del files[path]
        files = self._store_blobs(repo, files, added)

        commit_id = self._add_commit(
            repo,
            parent=head,
            files=files,
            title=str(header.get("summary", "")),
            message=str(header.get("description", "")),
        )
        repo.branches[branch] = commit_id
        self.save(repo)
        return commit_id

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> str:
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        commit_id = repo.resolve(starting_point or DEFAULT_BRANCH)
        repo.branches[branch] = commit_id
        self.save(repo)
        return commit_id

    def delete_branch(self, repo: Repo, branch: str) -> None:
        if branch == DEFAULT_BRANCH:
            raise HubError(403, f"Cannot delete the default branch {DEFAULT_BRANCH!r}")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        del repo.branches[branch]
        self.save(repo)

    def save(self, repo: Repo) -> None:
        state_file = repo.directory / "repo.json"
        temporary = state_file.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(repo.to_state(), indent=1, sort_keys=True))
        os.replace(temporary, state_file)

    def _store_blobs(
        self, repo: Repo, files: dict[str, dict[str, Any]], added: dict[str, bytes]
    ) -> dict[str, dict[str, Any]]:
        files = dict(files)
        for path, content in added.items():
            oid = git_blob_oid(content)
            blob_path = repo.blob_path(oid)
            if not blob_path.exists():
                blob_path.write_bytes(content)
            files[path] = {"oid": oid, "size": len(content)}
        return files

    def _add_commit(
        self, repo: Repo, parent: str | None, files: dict[str, dict[str, Any]], title: str, message: str
    ) -> str:
        self.commit_counter += 1
        seed = json.dumps([repo.repo_id, parent, files, title, message, time.time_ns(), self.commit_counter])
        commit_id = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[commit_id] = {
            "parent": parent,
            "title": title,
            "message": message,
            "date": utc_now_iso(),
            "files": files,
        }
        return commit_id


class FailureRules:
    """Injected failures set through ``/_control/fail``, matched in the order they were added."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []

    def add(self, rule: dict[str, Any]) -> None:
        if not isinstance(rule.get("path_contains"), str):
            raise HubError(400, "Missing or invalid 'path_contains' (expected a string)")
        status = rule.get("status", 500)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise HubError(400, f"Invalid 'status' {status!r}: expected an integer from 400 to 599")
        times = rule.get("times")
        if times is not None and (not isinstance(times, int) or times < 1):
            raise HubError(400, f"Invalid 'times' {times!r}: expected a positive integer or null")
        with self.lock:
            self.rules.append(
                {
                    "path_contains": rule["path_contains"],
                    "status": status,
                    "message": str(rule.get("message") or "Injected failure"),
                    "method": rule.get("method"),
                    "error_code": rule.get("error_code"),
                    "times": times,
                }
            )

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def match(self, method: str, path: str) -> HubError | None:
        with self.lock:
            for rule in self.rules:
                if rule["path_contains"] not in path:
                    continue
                if rule["method"] is not None and rule["method"].upper() != method:
                    continue
                if rule["times"] is not None:
                    rule["times"] -= 1
                    if rule["times"] == 0:
                        self.rules.remove(rule)
                return HubError(rule["status"], rule["message"], rule["error_code"])
        return None


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        super().__init__(address, HubRequestHandler)
        self.store = HubStore(root)
        self.failures = FailureRules()
        self.request_log: list[list[str]] = []
        self.request_log_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class HubRequestHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the client's connections open, so every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes. With Nagle's algorithm on, the body
    # waits for the client's delayed ACK, about 40 ms per request on Linux loopback.
    disable_nagle_algorithm = True
    server: HubServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    # -- request plumbing ----------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        # Split before unquoting: the client quotes revisions and tree paths with safe="",
        # so an encoded '/' stays inside its segment.
        self.segments = [unquote(segment) for segment in url.path.split("/")[1:]]
        self.body = self._read_body()
        try:
            if url.path.startswith("/_control/"):
                self._handle_control(method, url.path)
                return
            with self.server.request_log_lock:
                self.server.request_log.append([method, self.path])
            injected = self.server.failures.match(method, self.path)
            if injected is not None:
                logger.info("Injected failure %d for %s %s", injected.status, method, self.path)
                raise injected
            with self.server.store.lock:
                self._route(method)
        except HubError as error:
            logger.info("%s %s failed with %d: %s", method, self.path, error.status, error.message)
            self._send_error(error)
        except Exception as error:  # A bug in this server: return 500 so that the test fails.
            logger.exception("Unhandled error on %s %s", method, self.path)
            self._send_error(HubError(500, f"Test Hub server error: {error!r}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    @property
    def authorized(self) -> bool:
        authorization = self.headers.get("Authorization", "")
        return authorization.startswith("Bearer ") and len(authorization) > len("Bearer ")

    def _require_auth(self) -> None:
        if not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8", headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.error_code is not None:
            headers["X-Error-Code"] = error.error_code
        self._send_json({"error": error.message, **error.extra_fields}, status=error.status, headers=headers)

    # -- routing ---------------------------------------------------------------------

    def _handle_control(self, method: str, path: str) -> None:
        if method == "POST" and path == "/_control/fail":
            self.server.failures.add(self._json_body())
            self._send_json({"ok": True})
        elif method == "POST" and path == "/_control/reset":
            self.server.failures.clear()
            with self.server.request_log_lock:
                self.server.request_log.clear()
            self._send_json({"ok": True})
        elif method == "GET" and path == "/_control/requests":
            with self.server.request_log_lock:
                self._send_json(list(self.server.request_log))
        else:
            raise HubError(404, f"Unknown control endpoint: {method} {path}")

    def _route(self, method: str) -> None:
        segments = self.segments
        if segments[:1] == ["api"]:
            self._route_api(method, segments[1:])
        elif len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{segments[0]}/{segments[1]}"
            self._resolve_file(repo_id, revision=segments[3], path="/".join(segments[4:]))
        elif len(segments) >= 6 and segments[0] in ("datasets", "spaces") and segments[3] == "resolve":
            raise repo_not_found()
        else:
            raise HubError(404, f"Not found: {method} {self.path}")

    def _route_api(self, method: str, segments: list[str]) -> None:
        if method == "POST" and segments == ["repos", "create"]:
            self._create_repo()
        elif method == "POST" and segments == ["validate-yaml"]:
            self._send_json({"errors": [], "warnings": []})
        elif method == "GET" and segments == ["whoami-v2"]:
            self._whoami()
        elif len(segments) >= 3 and segments[0] in ("datasets", "spaces"):
            raise repo_not_found()
        elif len(segments) >= 3 and segments[0] == "models":
            repo_id = f"{segments[1]}/{segments[2]}"
            self._route_repo(method, repo_id, segments[3:])
        else:
            raise HubError(404, f"Not found: {method} {self.path}")

    def _route_repo(self, method: str, repo_id: str, rest: list[str]) -> None:
        store = self.server.store
        repo = store.get(repo_id, self.authorized)
        action = rest[0] if rest else ""

        if method == "GET" and not rest:
            self._send_json(self._model_info(repo, DEFAULT_BRANCH))
        elif method == "GET" and action == "revision" and len(rest) == 2:
            self._send_json(self._model_info(repo, rest[1]))
        elif method == "GET" and action == "tree" and len(rest) >= 2:
            self._list_tree(repo, revision=rest[1], path="/".join(rest[2:]))
        elif method == "GET" and action == "refs" and len(rest) == 1:
            self._list_refs(repo)
        elif method == "GET" and action == "commits" and len(rest) == 2:
            self._list_commits(repo, rest[1])
        elif method == "POST" and action == "preupload" and len(rest) == 2:
            self._require_auth()
            self._preupload(repo, rest[1])
        elif method == "POST" and action == "commit" and len(rest) == 2:
            self._require_auth()
            self._commit(repo, rest[1])
        elif method in ("POST", "DELETE") and action == "branch" and len(rest) == 2:
            self._require_auth()
            self._branch(method, repo, rest[1])
        else:
            raise HubError(404, f"Not found: {method} {self.path}")

    # -- endpoints -------------------------------------------------------------------

    def _whoami(self) -> None:
        self._require_auth()
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER_NAME,
                "fullname": "hbll test user",
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": "write", "createdAt": utc_now_iso()},
                },
            }
        )

    def _create_repo(self) -> None:
        self._require_auth()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"Repo type {repo_type!r} is not supported by the test Hub server, only 'model'")
        name = payload.get("name")
        namespace = payload.get("organization") or USER_NAME
        for part in (namespace, name):
            if not isinstance(part, str) or not REPO_NAME_PATTERN.match(part):
                raise HubError(400, f"Invalid repo name or namespace: {part!r}")
        repo_id = f"{namespace}/{name}"
        if "visibility" in payload:
            private = payload["visibility"] == "private"
        else:
            private = bool(payload.get("private", False))

        repo, created = self.server.store.create_repo(repo_id, private)
        url = f"{self.server.endpoint}/{repo_id}"
        if not created:
            # create_repo(exist_ok=True) reads "url" from this 409 body.
            raise HubError(409, "You already created this model repo", extra_fields={"url": url})
        logger.info("Created repo %s (private=%s)", repo_id, private)
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _model_info(self, repo: Repo, revision: str) -> dict[str, Any]:
        commit_id = repo.resolve(revision)
        commit = repo.commits[commit_id]
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(repo.files_at(commit_id).items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling["blobId"] = entry["oid"]
                sibling["size"] = entry["size"]
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0]
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": namespace,
            "sha": commit_id,
            "lastModified": commit["date"],
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(entry["size"] for entry in repo.files_at(commit_id).values()),
        }

    def _list_tree(self, repo: Repo, revision: str, path: str) -> None:
        commit_id = repo.resolve(revision)
        files = repo.files_at(commit_id)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        below = {name: entry for name, entry in files.items() if name.startswith(prefix)}
        if prefix and not below:
            raise HubError(
                404, f"{path} does not exist on {revision!r}", "EntryNotFound", {"X-Repo-Commit": commit_id}
            )

        folders: dict[str, list[str]] = {}
        entries = []
        for name in sorted(below):
            relative_parts = name[len(prefix) :].split("/")
            # Every folder between the listed path and the file gets an entry in a
            # recursive listing, and only the first one in a flat listing.
            depth = len(relative_parts) - 1 if recursive else min(1, len(relative_parts) - 1)
            for level in range(1, depth + 1):
                folder = prefix + "/".join(relative_parts[:level])
                folders.setdefault(folder, []).append(name)
            if recursive or len(relative_parts) == 1:
                entries.append({"type": "file", "oid": below[name]["oid"], "size": below[name]["size"], "path": name})
        folder_entries = []
        for folder, contained in sorted(folders.items()):
            # Folder oid: a stable hash of the files below it, not git's tree id.
            listing = "\n".join(f"{name} {files[name]['oid']}" for name in sorted(contained))
            folder_oid = hashlib.sha1(listing.encode()).hexdigest()
            folder_entries.append({"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
        # NOTE: the listing is sent as one page, without a pagination Link header.
        self._send_json(folder_entries + entries)

    def _list_refs(self, repo: Repo) -> None:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
            for name, commit_id in sorted(repo.branches.items())
        ]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _list_commits(self, repo: Repo, revision: str) -> None:
        commit_id: str | None = repo.resolve(revision)
        history = []
        while commit_id is not None:
            commit = repo.commits[commit_id]
            history.append(
                {
                    "id": commit_id,
                    "title": commit["title"],
                    "message": commit["message"],
                    "date": commit["date"],
                    "authors": [{"user": USER_NAME}],
                }
            )
            commit_id = commit["parent"]
        self._send_json(history)

    def _preupload(self, repo: Repo, revision: str) -> None:
        files = repo.files_at(repo.resolve(revision))
        payload = self._json_body()
        upload_modes = []
        for item in payload.get("files", []):
            path = str(item.get("path", ""))
            existing = files.get(path)
            upload_modes.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    # The client skips files whose git blob id equals this oid.
                    "oid": existing["oid"] if existing else None,
                }
            )
        self._send_json({"files": upload_modes})

    def _commit(self, repo: Repo, revision: str) -> None:
        if self.query.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "Pull requests are not supported by the test Hub server")
        lines = [line for line in self.body.split(b"\n") if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid NDJSON commit payload: {error}") from error
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the 'header' item")
        header = items[0].get("value") or {}
        if not str(header.get("summary", "")).strip():
            raise HubError(400, "The commit summary must not be empty")

        added: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for item in items[1:]:
            key = item.get("key")
            value = item.get("value") or {}
            path = str(value.get("path", ""))
            if key == "deletedFolder":
                path = path.strip("/")
            validate_path_in_repo(path)
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}, expected 'base64'")
                added[path] = base64.b64decode(value.get("content", ""), validate=True)
            elif key == "deletedFile":
                deleted_files.append(path)
            elif key == "deletedFolder":
                deleted_folders.append(path)
            elif key == "lfsFile":
                raise HubError(400, f"LFS files are not supported by the test Hub server: {path}")
            else:
                raise HubError(400, f"Unknown commit operation {key!r} for {path}")

        commit_id = self.server.store.commit(repo, revision, header, added, deleted_files, deleted_folders)
        logger.info(
            "Commit %s on %s@%s: %d added, %d deleted",
            commit_id,
            repo.repo_id,
            revision,
            len(added),
            len(deleted_files) + len(deleted_folders),
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{commit_id}",
                "hookOutput": "",
            }
        )

    def _branch(self, method: str, repo: Repo, branch: str) -> None:
        if method == "DELETE":
            self.server.store.delete_branch(repo, branch)
            self._send_json({})
            return
        if not BRANCH_NAME_PATTERN.match(branch) or branch.startswith("refs/") or ".." in branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        starting_point = self._json_body().get("startingPoint")
        commit_id = self.server.store.create_branch(repo, branch, starting_point)
        logger.info("Created branch %s on %s at %s", branch, repo.repo_id, commit_id)
        self._send_json({"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": commit_id})

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.server.store.get(repo_id, self.authorized)
        commit_id = repo.resolve(revision)
        entry = repo.files_at(commit_id).get(path)
        if entry is None:
            # The client reads X-Repo-Commit from this 404 to cache that the file is missing.
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit_id})
        content = repo.blob_path(entry["oid"]).read_bytes()
        headers = {
            "ETag": f'"{entry["oid"]}"',
            "X-Repo-Commit": commit_id,
            "Accept-Ranges": "bytes",
        }
        status = 200
        byte_range = self._parse_range(len(content))
        if byte_range is not None:
            start, end = byte_range
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content = content[start : end + 1]
            status = 206
        self._send(status, content, "application/octet-stream", headers)

    def _parse_range(self, size: int) -> tuple[int, int] | None:
        """Return the inclusive byte range of a ``Range: bytes=START-[END]`` header, if any."""
        header = self.headers.get("Range")
        if not header:
            return None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
        if match is None:
            raise HubError(416, f"Unsupported Range header {header!r}, expected 'bytes=START-[END]'")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else size - 1
        if start >= size or end < start:
            raise HubError(416, f"Range {header!r} is outside the file of {size} bytes")
        return start, min(end, size - 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder that stores the repos (created if missing)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="file that receives the bound port once the server listens")
    parser.add_argument("--log-level", default="INFO", help="logging level of the request log on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.root.mkdir(parents=True, exist_ok=True)
    server = HubServer(("127.0.0.1", args.port), args.root.resolve())
    # SIGTERM stops serve_forever through SystemExit so that the socket is closed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if args.port_file is not None:
        # Write then rename, so a reader never reads a partial port number.
        temporary = args.port_file.with_name(args.port_file.name + ".tmp")
        temporary.write_text(str(server.server_address[1]))
        os.replace(temporary, args.port_file)
    logger.info("Serving on %s with root %s (pid %d)", server.endpoint, args.root, os.getpid())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        logger.info("Stopped serving on %s", server.endpoint)


if __name__ == "__main__":
    main()
