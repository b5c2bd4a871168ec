"""A stand-in for huggingface.co on localhost: serves folders as model repositories, answering
what huggingface_hub and sdstream's downloader ask of the hub.

- `GET /api/models/{id}/revision/{rev}` (with `?blobs=true`: each file's size and git blob
  hash, and for files kept in LFS their SHA-256): the commit and the files;
- `GET /api/models/{id}/tree/{rev}?recursive=true`: the same as a tree (folders and files);
- `HEAD` and `GET /{id}/resolve/{rev}/{file}`, whole or from a `Range`, with the headers the
  hub sends (`X-Repo-Commit`, `ETag`, and `X-Linked-Etag`/`X-Linked-Size` for LFS files).

Weight files are LFS files, as on the hub; the rest are git blobs, named by git's hash.
"""

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "4f2a9c1e7b3d5a6c8e0f1a2b3c4d5e6f7a8b9c0d"
LFS_ENDINGS = (".safetensors", ".bin", ".pth", ".ckpt", ".pt")


def git_blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repository:
    def __init__(self, folder: Path):
        self.files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    def sibling(self, name: str, blobs: bool) -> dict:
        entry = {"rfilename": name}
        if blobs:
            data = self.files[name]
            entry.update(size=len(data), blobId=git_blob_hash(data))
            if name.endswith(LFS_ENDINGS):
                entry["lfs"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
        return entry


    def tree(self) -> list:
        """`/api/models/{id}/tree/{rev}?recursive=true`: folders and files."""
        entries, folders = [], set()
        for name, data in self.files.items():
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folders.add("/".join(parts[:depth]))
            entry = {"type": "file", "oid": git_blob_hash(data), "size": len(data), "path": name}
            if name.endswith(LFS_ENDINGS):
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        return entries


class StandInHub:
    """Serves `repos` ({id: folder}) until `close`; `requests` lists what it was asked."""

    def __init__(self, repos: dict):
        self.repos = {repo_id: Repository(Path(folder)) for repo_id, folder in repos.items()}
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def file_requests(self):
        """The (method, path, range) of every request for a file (not a listing)."""
        return [r for r in self.requests if "/resolve/" in r[1]]

    def _send(self, handler, status, headers, data, body):
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _answer(self, handler, body):
        url = urlsplit(handler.path)
        path = unquote(url.path)
        self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        for repo_id, repo in self.repos.items():
            if path.startswith(f"/api/models/{repo_id}/tree/"):
                data = json.dumps(repo.tree()).encode()
                return self._send(handler, 200, {"Content-Type": "application/json"}, data, body)
            listing = f"/api/models/{repo_id}/revision/"
            if path.startswith(listing):
                blobs = "blobs=true" in url.query
                data = json.dumps({
                    "id": repo_id,
                    "sha": COMMIT,
                    "siblings": [repo.sibling(name, blobs) for name in repo.files],
                }).encode()
                return self._send(handler, 200, {"Content-Type": "application/json"}, data, body)
            prefix = f"/{repo_id}/resolve/"
            if not path.startswith(prefix):
                continue
            revision, _, name = path[len(prefix):].partition("/")
            if revision not in ("main", COMMIT) or name not in repo.files:
                return self._send(handler, 404, {"X-Error-Code": "EntryNotFound"}, b"", body)
            data = repo.files[name]
            headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
            if name.endswith(LFS_ENDINGS):
                sha256 = hashlib.sha256(data).hexdigest()
                headers.update({
                    "ETag": f'"{sha256}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                })
            else:
                headers["ETag"] = f'"{git_blob_hash(data)}"'
            wanted = handler.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                start_text, _, end_text = wanted[len("bytes="):].partition("-")
                start = int(start_text or 0)
                end = min(int(end_text), len(data) - 1) if end_text else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(handler, 206, headers, data[start:end + 1], body)
            return self._send(handler, 200, headers, data, body)
        return self._send(handler, 404, {"X-Error-Code": "RepoNotFound"}, b"", body)
