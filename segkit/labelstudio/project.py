"""A live Label Studio project as a dataset: its JSON export read by the Label Studio JSON reader,
with every task's image fetched through Label Studio into an on-disk cache.

The cache (``~/.cache/segkit/labelstudio/<server>/project-<id>/``, or ``$XDG_CACHE_HOME``) keeps the
images and each one's HTTP validators (ETag, Last-Modified): a second run asks the server with them
and downloads only what changed. ``tasks.json`` there is the export as read, with each task's image
pointing at its cached copy, so ``segkit check`` on that folder shows exactly what training used.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from PIL import Image

from segkit.atomic import atomic_write, write_json
from segkit.data.images import ImageError, ImageTooLargeError, load_scaled
from segkit.labelstudio.client import Client, LabelStudioError, parse_project_url, redact, resolve_api_key
from segkit.labelstudio.egress import ALLOW_HOSTS_ENV, EgressPolicy
from segkit.data.readers.labelstudio import image_reference, read_labelstudio
from segkit.data.records import DatasetRecords, Problem


def default_cache_dir() -> Path:
    """Where project images are cached: ``$XDG_CACHE_HOME/segkit/labelstudio`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segkit" / "labelstudio"


def cache_folder(server: str, project: int | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache of one project's images and export: ``<cache_dir>/<server>/project-<id>``."""
    return Path(cache_dir or default_cache_dir()) / _slug(server) / f"project-{project}"


def load_project(url: str, api_key: str | None = None, cache_dir: str | os.PathLike | None = None,
                 client: Client | None = None) -> DatasetRecords:
    """Read the project at ``url`` (as in the browser) into records; images come through the cache.

    ``records.origin`` says where the data came from (server, project id and title, export time),
    never the key. Tasks without a usable annotation are reported and their images not fetched; an
    image that cannot be fetched is reported for its task, and the other tasks are used.
    """
    server, project_id = parse_project_url(url)
    folder = cache_folder(server, project_id, cache_dir)
    owned = client is None
    policy = _egress_policy(server)
    client = client or Client(server, resolve_api_key(api_key), request_hook=policy and policy.hook,
                              transport=policy and policy.transport())
    try:
        project = client.get_json(f"/api/projects/{project_id}")
        tasks = client.get_json(f"/api/projects/{project_id}/export", exportType="JSON", download_all_tasks="true")
        exported_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not isinstance(tasks, list):
            raise LabelStudioError(f"{url}: the JSON export is not a list of tasks")
        cache = ImageCache(folder)
        local_tasks, problems = fetch_images(client, tasks, cache)
    finally:
        if owned:
            client.close()
    tasks_file = write_json(folder / "tasks.json", local_tasks)
    if not local_tasks:
        raise LabelStudioError(f"{url}: the project has no tasks with annotations whose image could be fetched"
                               + (f" ({problems[0].detail})" if problems else ""))
    records = read_labelstudio(tasks_file, local_tasks)
    records.format, records.source = "labelstudio-project", url
    records.problems[:0] = problems
    records.origin = {"label_studio": server, "project": project_id, "title": project.get("title"),
                      "exported_at": exported_at, "tasks": len(tasks), "cache": str(folder),
                      "images_downloaded": cache.downloaded, "images_unchanged": cache.reused}
    return records


def _egress_policy(server: str) -> EgressPolicy | None:
    """The ML backend's rule on where images may come from, for a training it started (None otherwise:
    a user training from the command line reads whatever the tasks name, as they chose)."""
    if ALLOW_HOSTS_ENV not in os.environ:
        return None
    return EgressPolicy.create(server, os.environ[ALLOW_HOSTS_ENV].split(","))


def fetch_images(client: Client, tasks: list[dict], cache: ImageCache) -> tuple[list[dict], list[Problem]]:
    """Tasks worth reading, each pointing at its image's copy in ``cache`` (a path relative to its folder)."""
    out, problems = [], []
    try:
        for task in tasks:
            what = f"{client.server} task {task.get('id')}"
            if not any(isinstance(a, dict) and not a.get("was_cancelled") for a in task.get("annotations") or []):
                problems.append(Problem("unlabeled_task", what, "not annotated; left out", True))
                continue
            ref = image_reference(task.get("data"))
            if not ref:
                problems.append(Problem("missing_image", what, "the task's data names no image", True))
                continue
            try:
                local = cache.fetch(client, image_url(client, ref, task.get("id")), ref)
            except LabelStudioError as e:
                problems.append(Problem("missing_image", what, f"image {redact(ref)!r} could not be fetched: {e}",
                                        True))
                continue
            task = copy.deepcopy(task)
            for key, value in task["data"].items():
                if value == ref:
                    task["data"][key] = local
            out.append(task)
    finally:
        cache.save()
    return out, problems


def image_url(client: Client, ref: str, task_id: Any) -> str:
    """The URL to download a task's image from: server paths and local files through the server,
    cloud URIs (s3://, gs://, azure-blob://) through Label Studio's presign redirect.

    Whoever creates a task writes its reference, and the key goes with every request to Label Studio's
    origin: so a reference there must be an image path (:func:`is_image_path`: ``/data/...``, or the
    presign route of an integer task id), never an API path such as ``/api/projects/1/export``.
    """
    parsed = urlparse(ref)
    if parsed.scheme in ("http", "https") and not client.same_server(ref):
        return ref  # another origin: no key goes there, and the backend's egress rule decides
    if parsed.scheme in ("http", "https") or ref.startswith("/"):
        prefix = urlparse(client.server).path.rstrip("/")  # Label Studio served under a path: /ls/data/...
        path = parsed.path[len(prefix):] if parsed.scheme and parsed.path.startswith(prefix + "/") else parsed.path
        if not is_image_path(path):
            raise LabelStudioError(f"{redact(ref)}: not a path Label Studio serves images from (/data/...): "
                                   f"refused, the API key would go with it")
        return ref
    if parsed.scheme and integer_id(task_id) is not None:
        token = base64.urlsafe_b64encode(ref.encode()).decode()
        return f"/tasks/{task_id}/presign/?fileuri={token}"
    raise LabelStudioError(f"{redact(ref)!r} is not a URL Label Studio can serve" +
                           (" (a cloud URI needs the task's integer id)" if parsed.scheme else ""))


_PRESIGN = re.compile(r"/tasks/[0-9]+/presign/?")


def is_image_path(path: str) -> bool:
    """Whether a path on Label Studio's server is one of its image routes: under ``/data/`` (uploads, local
    files, storage) or a task's presign redirect, with no ``.``/``..`` segment in any spelling."""
    decoded = unquote(unquote(path))  # %252e%252e is %2e%2e once decoded, and .. twice
    if "\\" in decoded or any(part in (".", "..") for part in decoded.split("/")):
        return False
    return decoded.startswith("/data/") or bool(_PRESIGN.fullmatch(decoded))


def integer_id(value: Any) -> int | None:
    """A task id as Label Studio gives it: an int (not a bool); None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class TaskImage:
    """A task's image in an :class:`ImageCache`: how the task names it, the URL it came from, the cached file.

    The one way segkit gets a task's image for a prediction (the ML backend, ``segkit prelabel``), in two
    steps so that a caller may download many at once and decode each just before its forward pass.
    """

    ref: str  # as the task's data names it (its image_entry's file name)
    url: str  # what was downloaded: see image_url
    path: Path  # the cached copy

    @classmethod
    def download(cls, client: Client, cache: ImageCache, task: Any) -> TaskImage:
        """Fetch ``task``'s image into ``cache`` (only what changed since the last time); LabelStudioError
        when the task names no image or it cannot be fetched."""
        ref = image_reference(task.get("data")) if isinstance(task, dict) else None
        if not ref:
            raise LabelStudioError("the task's data names no image")
        url = image_url(client, ref, task.get("id"))
        return cls(ref, url, cache.folder / cache.fetch(client, url, ref))

    def load(self, client: Client, cache: ImageCache, max_side: int | None = None,
             max_pixels: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
        """(the image, no larger than ``max_side``; its original size), as :func:`segkit.data.images.load_scaled`.

        A copy that does not decode is fetched again, whole, once: it may be truncated, or the server's file
        may have been broken when it was fetched. One over ``max_pixels`` is not: fetching changes nothing.
        """
        try:
            return load_scaled(self.path, max_side, max_pixels)
        except ImageTooLargeError:
            raise
        except ImageError:
            cache.forget(self.url)
            return load_scaled(cache.folder / cache.fetch(client, self.url, self.ref), max_side, max_pixels)


DEFAULT_MAX_DOWNLOAD = 50 * 2**20  # bytes of one image; a phone's 50 MP JPEG is 15-25 MB


class ImageCache:
    """Downloaded images by URL, with their validators, under ``folder/images``; ``save`` writes the index.

    ``max_bytes`` caps what the cache keeps (the least recently used images go first; None: no cap);
    ``max_download`` caps one download, which stops there without reading the rest. Safe to share
    between threads.
    """

    def __init__(self, folder: Path, max_bytes: int | None = None, max_download: int = DEFAULT_MAX_DOWNLOAD):
        self.folder, self.max_bytes, self.max_download = folder, max_bytes, max_download
        self.index_file = folder / "images.json"
        self.index: dict[str, dict] = json.loads(self.index_file.read_text()) if self.index_file.is_file() else {}
        self.downloaded = self.reused = 0
        self._lock = threading.Lock()

    def fetch(self, client: Client, url: str, ref: str) -> str:
        """Path of the cached image, relative to the folder; downloads it when new, changed or broken."""
        with self._lock:
            entry = self._intact(url)
        # the key goes only to Label Studio's origin: Client's auth decides that for every request and redirect
        response = client.download(url, self.max_download, headers=_conditional_headers(entry))
        if response.status_code == 304 and entry:
            with self._lock:
                entry["used"] = time.time()
                self.reused += 1
            return entry["file"]
        rel = f"images/{hashlib.sha1(url.encode()).hexdigest()[:12]}-{_file_name(ref)}"
        atomic_write(self.folder / rel, response.content)
        with self._lock:
            self.index[url] = {"file": rel, "etag": response.headers.get("etag"), "size": len(response.content),
                               "last_modified": response.headers.get("last-modified"), "used": time.time()}
            self.downloaded += 1
            self._evict(keep=url)
        return rel

    def forget(self, url: str) -> None:
        """Drop ``url``'s copy (it would not decode): the next fetch downloads it whole, unconditionally."""
        with self._lock:
            entry = self.index.pop(url, None)
            if entry:
                (self.folder / entry["file"]).unlink(missing_ok=True)

    def save(self) -> None:
        with self._lock:
            write_json(self.index_file, self.index, indent=1)

    def _intact(self, url: str) -> dict | None:
        """The entry of ``url`` if its file is there at the size it was downloaded at. A truncated or
        missing copy must not be revalidated: the server would answer 304 and the broken file live on."""
        entry = self.index.get(url)
        if not entry:
            return None
        path = self.folder / entry["file"]
        if not path.is_file() or ("size" in entry and path.stat().st_size != entry["size"]):
            return None
        return entry

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        total = sum(e.get("size", 0) for e in self.index.values())
        for url in sorted(self.index, key=lambda u: self.index[u].get("used", 0)):
            if total <= self.max_bytes:
                break
            if url != keep:
                entry = self.index.pop(url)
                (self.folder / entry["file"]).unlink(missing_ok=True)
                total -= entry.get("size", 0)


def _conditional_headers(entry: dict | None) -> dict[str, str]:
    headers = {}
    if entry and entry.get("etag"):
        headers["If-None-Match"] = entry["etag"]
    if entry and entry.get("last_modified"):
        headers["If-Modified-Since"] = entry["last_modified"]
    return headers


def _file_name(ref: str) -> str:
    parsed = urlparse(ref)
    name = PurePosixPath(unquote(parse_qs(parsed.query).get("d", [parsed.path])[0])).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-80:] or "image"


def _slug(server: str) -> str:
    # no leading dot: a server spelled "http://.." must not name the cache's parent folder
    return re.sub(r"[^A-Za-z0-9.-]+", "_", urlparse(server).netloc + urlparse(server).path).strip("_").lstrip(".") \
        or "_"
