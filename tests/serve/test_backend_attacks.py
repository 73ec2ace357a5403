"""Faults and attacks on ``segkit ml-backend``, each against a real backend process.

The test plays every other party on loopback: a stand-in Label Studio (origin A) that serves images and
records who sent which key, a storage server that Label Studio redirects to (origin B, allowed with
``--allow-host``), and a stranger's server (origin C) that must never hear from the backend.
"""
from __future__ import annotations

import base64
import gzip
import http.server
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from segkit.labelstudio.client import Client, redact
from segkit.labelstudio.egress import EgressPolicy, is_public
from tests.helpers import REPO, SAMPLE, free_port

KEY = "0123456789abcdef0123456789abcdef0123beef"  # the user's Label Studio key
CONFIG = ('<View><Image name="photo" value="$img"/><PolygonLabels name="outline" toName="photo">'
          '<Label value="leaf"/><Label value="pebble"/><Label value="shell"/></PolygonLabels></View>')
SLOW_SECONDS, FETCH_TIMEOUT = 40.0, 10.0  # wide apart: a busy 2-core machine takes seconds a forward
MAX_DOWNLOAD_MB = 1


class Recorder(http.server.ThreadingHTTPServer):
    """A loopback HTTP server whose routes are functions of the request; it keeps every request's path and
    headers, so a test can tell who was asked for what, with which key."""

    daemon_threads = True

    def __init__(self, routes: dict):
        self.routes, self.seen = routes, []
        self.release = threading.Event()  # ends requests that hang on purpose
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def keys_sent(self, path_prefix: str = "") -> list[str | None]:
        return [h.get("authorization") for p, h in self.seen if p.startswith(path_prefix)]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = self.server.routes.get(self.path.split("?")[0])
        status, headers, body = route(self) if route else (404, {}, b"not here")
        try:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                if v is not None:  # None: leave the header out (a body that ends when the connection closes)
                    self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the backend hung up, as it should on a too-big image
            pass

    def log_message(self, *args):
        pass


def _jpeg(index: int = 0) -> bytes:
    return sorted((SAMPLE / "val" / "images").glob("*.jpg"))[index].read_bytes()


def _bomb() -> bytes:
    """A PNG whose header says 13000 x 13000 (169 MP once decoded) in a few hundred bytes: its size must be
    refused from the header, before anything is decoded."""
    out = io.BytesIO()
    Image.new("L", (64, 64)).save(out, "PNG")
    png = bytearray(out.getvalue())
    png[16:24] = struct.pack(">II", 13000, 13000)  # IHDR's width and height, then its CRC
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _annotated_task(task_id: int, image: str) -> dict:
    region = {"type": "polygonlabels", "from_name": "outline", "to_name": "photo", "original_width": 100,
              "original_height": 100, "value": {"points": [[10, 10], [60, 10], [60, 60]], "polygonlabels": ["leaf"]}}
    return {"id": task_id, "data": {"img": image}, "annotations": [{"id": task_id, "result": [region]}]}


def _static(body: bytes, etag: str | None = None):
    def route(handler):
        if etag and handler.headers.get("If-None-Match") == etag:
            return 304, {"ETag": etag}, b""
        return 200, {"Content-Type": "image/jpeg", **({"ETag": etag} if etag else {})}, body
    return route


def _redirect(location: str):
    return lambda handler: (302, {"Location": location}, b"")


def _slow(handler):
    handler.server.release.wait(SLOW_SECONDS)
    return 200, {}, _jpeg()


def _hang(handler):
    handler.server.release.wait(120)
    return 503, {}, b"released"


@pytest.fixture(scope="module")
def servers():
    stranger = Recorder({})
    storage = Recorder({"/img.jpg": _static(_jpeg(1))})
    bomb = _bomb()
    ls = Recorder({
        "/data/upload/1/a.jpg": _static(_jpeg(0), etag='"a1"'),
        **{f"/data/upload/1/c{i}.jpg": _static(_jpeg(i)) for i in range(6)},
        "/data/upload/1/to-storage.jpg": _redirect(f"{storage.url}/img.jpg"),
        "/data/upload/1/to-stranger.jpg": _redirect(f"{stranger.url}/img.jpg"),
        "/data/upload/1/loop.jpg": _redirect("/data/upload/1/loop.jpg"),
        "/data/upload/1/slow.jpg": _slow,
        "/data/upload/1/big.jpg": _static(b"\xff\xd8" + os.urandom(3 * 2**20)),
        "/data/upload/1/unsized.jpg": lambda h: (200, {"Content-Length": None}, b"\xff\xd8" + os.urandom(3 * 2**20)),
        "/data/upload/1/gzip.jpg": lambda h: (200, {"Content-Encoding": "gzip"}, gzip.compress(bytes(20 * 2**20))),
        "/data/upload/1/bomb.png": _static(bomb),
        "/api/projects/9": _hang,  # a retraining's first call: it waits here until the test ends
        "/api/projects/5": lambda h: (200, {"Content-Type": "application/json"}, b'{"title": "p5"}'),
        "/api/projects/5/export": lambda h: (200, {"Content-Type": "application/json"}, json.dumps(
            [_annotated_task(1, "/data/upload/1/c0.jpg"), _annotated_task(2, f"{stranger.url}/inside.jpg")]).encode()),
    })
    yield {"ls": ls, "storage": storage, "stranger": stranger}
    for server in (ls, storage, stranger):
        server.release.set()
        server.shutdown()


class Backend:
    """``segkit ml-backend`` in a process of its own, with its log."""

    def __init__(self, checkpoint: Path, tmp: Path, env: dict, *args: str):
        self.port, self.log, self.cache = free_port(), tmp / "backend.log", tmp / "cache"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "BASIC_AUTH"))}
        cmd = [sys.executable, "-m", "segkit", "ml-backend", "--checkpoint", str(checkpoint), "--port", str(self.port),
               "--max-detections", "3", "--runs-dir", str(tmp / "runs"), *args]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, env={**base, "XDG_CACHE_HOME": str(self.cache), **env}, stdout=f,
                                         stderr=subprocess.STDOUT, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> "Backend":
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.3)

    def predict(self, *images, project=1, timeout: float = 60) -> list[dict]:
        tasks = [{"id": i, "data": {"img": im}} if not isinstance(im, dict) else im for i, im in enumerate(images)]
        answer = httpx.post(f"{self.url}/predict", json={"tasks": tasks, "project": f"{project}.1700000000",
                                                         "label_config": CONFIG}, timeout=timeout)
        assert answer.status_code == 200, answer.text
        return answer.json()["results"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def backend(servers, untrained_checkpoint, tmp_path_factory):
    """The user's backend: their Label Studio's URL and key from the environment, storage allowed by name."""
    storage = servers["storage"].url.removeprefix("http://")
    proc = Backend(untrained_checkpoint, tmp_path_factory.mktemp("backend"),
                   {"LABEL_STUDIO_URL": servers["ls"].url, "LABEL_STUDIO_API_KEY": KEY},
                   "--allow-host", storage, "--max-download-mb", str(MAX_DOWNLOAD_MB),
                   "--fetch-timeout", str(FETCH_TIMEOUT), "--cache-mb", "0.05")
    yield proc.wait_ready()
    proc.stop()


def _refusal(checkpoint: Path, tmp: Path, env: dict, *args: str) -> str:
    proc = Backend(checkpoint, tmp, env, *args)
    assert proc.proc.wait(60) == 2
    return proc.log.read_text()


# --- rule 2: closed unless opened on purpose --------------------------------------------------------

def test_listening_beyond_loopback_without_credentials_is_refused(untrained_checkpoint, tmp_path):
    out = _refusal(untrained_checkpoint, tmp_path, {}, "--host", "0.0.0.0")
    assert "BASIC_AUTH_USER" in out and "BASIC_AUTH_PASS" in out and "--no-auth" in out


def test_one_basic_auth_variable_without_the_other_is_refused(untrained_checkpoint, tmp_path):
    out = _refusal(untrained_checkpoint, tmp_path, {"BASIC_AUTH_USER": "ann"})
    assert "BASIC_AUTH_PASS is not set" in out


def test_demo_ls_backend_beyond_loopback_without_credentials_is_refused(untrained_checkpoint, monkeypatch):
    import importlib.util

    from segkit.inference.predictor import Predictor

    spec = importlib.util.spec_from_file_location("segkit_demo", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEGKIT_LS_BACKEND", "1")
    predictor = Predictor.from_checkpoint(untrained_checkpoint)
    with pytest.raises(SystemExit, match="--no-auth"):
        demo.ls_backend_config(demo.parse_args(["--host", "0.0.0.0"]), predictor)
    with pytest.raises(SystemExit, match="--no-auth"):  # a share link is public whatever --host says
        demo.ls_backend_config(demo.parse_args(["--share"]), predictor)
    assert demo.ls_backend_config(demo.parse_args(["--host", "0.0.0.0", "--no-auth"]), predictor) is not None
    monkeypatch.setenv("BASIC_AUTH_USER", "ann")
    monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret")
    assert demo.ls_backend_config(demo.parse_args(["--host", "0.0.0.0"]), predictor).basic_auth == ("ann", "s3cret")


# --- rule 1: the key goes only where the user sent it --------------------------------------------------

def test_a_key_without_its_server_is_refused_at_start(untrained_checkpoint, tmp_path):
    out = _refusal(untrained_checkpoint, tmp_path, {"LABEL_STUDIO_API_KEY": KEY})
    assert "LABEL_STUDIO_URL" in out and KEY not in out


def test_setup_cannot_send_the_users_key_elsewhere(backend, servers):
    ls, stranger = servers["ls"], servers["stranger"]
    answer = httpx.post(f"{backend.url}/setup", json={"project": "1.1", "hostname": stranger.url,
                                                      "access_token": "attacker", "schema": CONFIG})
    assert answer.status_code == 200
    backend.predict("/data/upload/1/c0.jpg")
    assert ls.keys_sent("/data/upload/1/c0.jpg") == [f"Token {KEY}"]
    assert stranger.seen == []


def test_a_key_from_setup_goes_only_to_the_host_it_came_with(servers, untrained_checkpoint, tmp_path):
    ls, stranger = servers["ls"], servers["stranger"]
    proc = Backend(untrained_checkpoint, tmp_path, {}).wait_ready()
    try:
        for body in ({"project": "1.1", "hostname": ls.url, "access_token": "from-setup"},
                     {"project": "1.1", "hostname": stranger.url}):  # a stranger names a server, no key
            assert httpx.post(f"{proc.url}/setup", json=body).status_code == 200
        proc.predict("/data/upload/1/c1.jpg")
    finally:
        proc.stop()
    assert ls.keys_sent("/data/upload/1/c1.jpg") == ["Token from-setup"]
    assert stranger.seen == []


def test_redirects_to_another_origin_never_carry_the_key(backend, servers):
    backend.predict("/data/upload/1/to-storage.jpg")
    assert servers["ls"].keys_sent("/data/upload/1/to-storage.jpg") == [f"Token {KEY}"]
    assert servers["storage"].keys_sent("/img.jpg") == [None]


def test_a_scheme_in_capitals_does_not_make_a_stranger_label_studio(backend, servers):
    backend.predict(f"HTTP://127.0.0.1:{servers['storage'].server_address[1]}/img.jpg")
    assert servers["storage"].keys_sent("/img.jpg") and set(servers["storage"].keys_sent("/img.jpg")) == {None}


def test_a_token_refresh_is_never_redirected_to_another_origin():
    """A personal access token is itself the body of the refresh: a 307 would carry it elsewhere."""
    seen = []

    def label_studio(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "ls.example.org":
            return httpx.Response(307, headers={"Location": "https://other.example.net/collect"})
        return httpx.Response(200, json={"access": "stolen"})

    pat = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    with Client("https://ls.example.org", pat, transport=httpx.MockTransport(label_studio)) as client:
        with pytest.raises(Exception, match="refused to send a POST"):
            client.get_json("/api/projects/1")
    assert seen == ["https://ls.example.org/api/token/refresh/"]


def test_http_never_carries_a_key_meant_for_https():
    client = Client("https://ls.example.org", KEY)
    assert client.same_server("https://ls.example.org:443/data/upload/1/a.jpg")
    assert not client.same_server("http://ls.example.org/data/upload/1/a.jpg")
    assert not client.same_server("https://ls.example.org:8443/a.jpg")


def test_signed_links_are_not_logged_in_full(backend, servers):
    signed = f"{servers['storage'].url}/missing.jpg?X-Amz-Signature=SECRET123&X-Amz-Credential=AKIA"
    [result] = backend.predict(signed)
    assert result["result"] == []
    log = backend.log.read_text()
    assert "missing.jpg" in log and "SECRET123" not in log and "AKIA" not in log
    assert redact(signed) == f"{servers['storage'].url}/missing.jpg?..."
    assert redact("https://minio:s3cret@cdn.example/a.jpg") == "https://cdn.example/a.jpg"


# --- rule 3: fetch only what a task may name ---------------------------------------------------------------

def test_private_addresses_are_refused_unless_allowed(backend, servers):
    stranger = servers["stranger"]
    results = backend.predict(f"{stranger.url}/img.jpg", f"http://localhost:{stranger.server_address[1]}/x.jpg",
                              "/data/upload/1/to-stranger.jpg")  # through a redirect, too
    assert [r["result"] for r in results] == [[], [], []]
    assert stranger.seen == []
    assert "--allow-host" in backend.log.read_text()


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("::1", False),
    ("fe80::1%eth0", False), ("::ffff:127.0.0.1", False), ("fd00::1", False), ("0.0.0.0", False),
    ("100.64.0.1", False), ("224.0.0.1", False), ("64:ff9b::a9fe:a9fe", False), ("2002:7f00:1::", False),
    ("::127.0.0.1", False), ("64:ff9b::808:808", True)])
def test_which_addresses_count_as_public(address, public):
    assert is_public(address) is public


def test_allowed_hosts_and_label_studio_pass_the_policy():
    policy = EgressPolicy.create("http://10.0.0.5:8080", ["minio.lan", "127.0.0.1:9000"],)
    resolved = {"minio.lan": ["10.0.0.7"], "127.0.0.1": ["127.0.0.1"], "cdn.example": ["93.184.216.34"],
                "internal.example": ["10.0.0.9"]}
    policy = EgressPolicy(policy.home, policy.allow_hosts, lambda host, port: resolved[host])
    for ok in ("http://10.0.0.5:8080/data/upload/1/a.jpg", "http://minio.lan/b/x.jpg", "http://127.0.0.1:9000/x",
               "https://cdn.example/x.jpg"):
        policy.check(ok)
    for bad in ("http://10.0.0.5:8081/x", "http://127.0.0.1:9001/x", "http://internal.example/x.jpg",
                "file:///etc/passwd", "ftp://cdn.example/x"):
        with pytest.raises(Exception, match="refused"):
            policy.check(bad)


def test_downloads_stop_at_the_size_limit(backend):
    """Declared or not, and compressed or not: a body is never read past the limit (a few KB of gzip can
    decode to gigabytes, so compressed answers are refused)."""
    results = backend.predict("/data/upload/1/big.jpg", "/data/upload/1/unsized.jpg", "/data/upload/1/gzip.jpg")
    assert [r["result"] for r in results] == [[], [], []]
    log = backend.log.read_text()
    assert f"download limit of {MAX_DOWNLOAD_MB} MB" in log and "stopped reading" in log and "gzip-encoded" in log
    assert not any(name in p.name for p in backend.cache.rglob("*") for name in ("big", "unsized", "gzip"))


# --- rule 4: one task's failure is that task's alone --------------------------------------------------------

def test_one_bad_task_leaves_the_others_answered(backend):
    results = backend.predict("/data/upload/1/c2.jpg", "/data/upload/1/loop.jpg", "http://[::1", {"data": {"img": 5}},
                              "junk", {"id": 9, "data": "not a dict"}, "/data/upload/1/c3.jpg")
    assert len(results) == 7
    assert results[0]["result"] and results[-1]["result"]  # a random-init model fills its 3 slots
    assert all(r["result"] == [] for r in results[1:-1])


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b'{"tasks": "x", "label_config": "c"}',
                                  b'{"tasks": [], "label_config": 5}', b"\xff\xfe", b"[" * 100_000])
def test_malformed_bodies_get_400_with_a_message(backend, body):
    for route in ("/predict", "/setup", "/webhook"):
        answer = httpx.post(f"{backend.url}{route}", content=body, headers={"Content-Type": "application/json"})
        if route != "/predict" and answer.status_code == 200:  # a JSON object that /setup or /webhook may ignore
            continue
        assert answer.status_code == 400 and answer.json()["detail"], (route, body, answer.text)


def test_odd_fields_get_an_answer_not_a_500(backend):
    for route, body in (("/predict", {"tasks": [{"data": {"img": "/data/upload/1/c0.jpg"}}], "project": "1" * 300,
                                      "label_config": CONFIG}),
                        ("/setup", {"project": 1, "hostname": "http://[::1", "access_token": "k"}),
                        ("/setup", {"project": "²", "hostname": 5, "schema": ["x"]}),
                        ("/webhook", {"action": "START_TRAINING", "project": {"id": "../../etc"}})):
        answer = httpx.post(f"{backend.url}{route}", json=body)
        assert answer.status_code in (200, 400), (route, answer.text)  # 400: a project id that is not one
        assert answer.status_code == 200 or answer.json()["detail"]


def test_a_web_page_cannot_drive_the_loopback_backend(backend):
    """Without auth the backend is this machine's alone: a page in the user's browser can post text/plain
    across sites without a preflight, and reach 127.0.0.1 through a DNS name rebound to it."""
    start = {"action": "START_TRAINING", "project": 1}
    answer = httpx.post(f"{backend.url}/webhook", content=json.dumps(start), headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415
    answer = httpx.post(f"{backend.url}/webhook", json=start, headers={"Host": "attacker.example:9090"})
    assert answer.status_code == 400
    assert httpx.get(f"{backend.url}/versions", headers={"Host": "attacker.example"}).status_code == 400
    assert httpx.get(f"{backend.url}/versions").json()["training"]["state"] == "idle"


# --- rule 5: no request waits on another's download ----------------------------------------------------

def test_a_slow_image_delays_only_its_own_request(backend, servers):
    asked = lambda: sum(path == "/data/upload/1/slow.jpg" for path, _ in servers["ls"].seen)  # noqa: E731
    before = asked()
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        slow = pool.submit(backend.predict, "/data/upload/1/slow.jpg", "/data/upload/1/c4.jpg")
        while asked() == before and time.monotonic() - started < FETCH_TIMEOUT:
            time.sleep(0.05)  # until the slow download has begun
        [fast] = backend.predict("/data/upload/1/c5.jpg")
        fast_seconds = time.monotonic() - started
        assert not slow.done()  # answered while the other request still waits on its image
        slow_results = slow.result()
        slow_seconds = time.monotonic() - started
    assert fast["result"] and fast_seconds < FETCH_TIMEOUT, fast_seconds
    # the slow request answers at its deadline, not the image's: the slow task empty, its neighbour predicted
    assert slow_results[0]["result"] == [] and slow_results[1]["result"]
    assert FETCH_TIMEOUT <= slow_seconds < SLOW_SECONDS / 2, slow_seconds


# --- rule 6: bounded memory and disk ----------------------------------------------------------------------

def test_a_decompression_bomb_is_refused(backend):
    [result] = backend.predict("/data/upload/1/bomb.png")
    assert result["result"] == []
    assert "bomb.png" in backend.log.read_text() and "pixels" in backend.log.read_text()


def test_a_truncated_cached_image_is_fetched_again(backend, servers):
    ls = servers["ls"]
    assert backend.predict("/data/upload/1/a.jpg")[0]["result"]
    [copy] = [p for p in backend.cache.rglob("*-a.jpg")]
    copy.write_bytes(copy.read_bytes()[:1000])  # as a crash or a full disk would leave it
    assert backend.predict("/data/upload/1/a.jpg")[0]["result"]
    conditional = [h.get("if-none-match") for p, h in ls.seen if p == "/data/upload/1/a.jpg"]
    assert conditional[-1] is None  # asked whole, not "is my broken copy still current?"
    assert copy.read_bytes() == _jpeg(0)


def test_the_image_cache_stays_under_its_cap(backend):
    backend.predict(*[f"/data/upload/1/c{i}.jpg" for i in range(6)])
    images = [p for p in backend.cache.rglob("images/*") if p.is_file()]
    assert images and sum(p.stat().st_size for p in images) <= 0.05 * 2**20  # the sample's images: 14-20 KB


def test_a_training_the_backend_starts_follows_the_same_rule(servers, tmp_path, monkeypatch):
    """The retraining reads the project in a child process: the backend hands it its rule (SEGKIT_ALLOW_HOSTS)."""
    from segkit.labelstudio.egress import ALLOW_HOSTS_ENV
    from segkit.labelstudio.project import load_project

    monkeypatch.setenv(ALLOW_HOSTS_ENV, "")
    records = load_project(f"{servers['ls'].url}/projects/5", api_key=KEY, cache_dir=tmp_path)
    assert len(records.images) == 1  # Label Studio's own image
    [problem] = [p for p in records.problems if p.kind == "missing_image"]
    assert "--allow-host" in problem.detail and servers["stranger"].seen == []


# --- rule 8: training children die with the backend; each project keeps its place ----------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_training_dies_with_the_backend_and_projects_keep_their_place(servers, untrained_checkpoint, tmp_path, sig):
    """SIGKILL leaves the backend no chance to stop its training: the child dies with it all the same. The key
    comes from a file here, and no process shows it on its command line."""
    (tmp_path / "key").write_text(KEY)
    proc = Backend(untrained_checkpoint, tmp_path, {"LABEL_STUDIO_URL": servers["ls"].url},
                   "--ls-token-file", str(tmp_path / "key")).wait_ready()
    asked = len(servers["ls"].keys_sent("/api/projects/9"))
    try:
        statuses = [httpx.post(f"{proc.url}/webhook", json={"action": "START_TRAINING", "project": {"id": p}}).json()
                    for p in (9, 10, 11, 10)]
        assert [s["status"] for s in statuses] == ["started", "queued", "queued", "queued"]
        deadline = time.monotonic() + 60
        while "pid" not in (training := httpx.get(f"{proc.url}/versions").json()["training"]):
            assert time.monotonic() < deadline, training
            time.sleep(0.2)
        assert training["queued"] == ["10", "11"]  # both wait, in order, each once
        pid = training["pid"]
        assert _alive(pid)
        for shown in (proc.proc.pid, pid):
            assert KEY.encode() not in Path(f"/proc/{shown}/cmdline").read_bytes()
        while len(servers["ls"].keys_sent("/api/projects/9")) == asked and time.monotonic() < deadline + 60:
            time.sleep(0.2)  # the child reads the project first (and waits there: /api/projects/9 hangs)
        assert servers["ls"].keys_sent("/api/projects/9")[-1] == f"Token {KEY}"  # the file's key, sent by the child
    finally:
        proc.proc.send_signal(sig)
        proc.proc.wait(60)
    deadline = time.monotonic() + 20
    while _alive(pid):
        assert time.monotonic() < deadline, f"segkit train (pid {pid}) outlived the backend"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its entry waits to be reaped


def test_basic_auth_guards_every_route(untrained_checkpoint, tmp_path):
    proc = Backend(untrained_checkpoint, tmp_path, {"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"},
                   "--host", "127.0.0.1")
    auth = {"Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode()}
    deadline = time.monotonic() + 120
    while True:
        assert proc.proc.poll() is None, proc.log.read_text()
        try:
            if httpx.get(f"{proc.url}/health", headers=auth, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    try:
        for method, route in (("GET", "/health"), ("GET", "/versions"), ("POST", "/setup"), ("POST", "/predict"),
                              ("POST", "/webhook")):
            answer = httpx.request(method, f"{proc.url}{route}", json={"action": "START_TRAINING", "project": 1})
            assert answer.status_code == 401, route
            odd = {"Authorization": "Basic " + base64.b64encode("é:x".encode()).decode()}  # not ASCII: still 401
            assert httpx.request(method, f"{proc.url}{route}", headers=odd).status_code == 401, route
    finally:
        proc.stop()
    assert not (tmp_path / "runs").exists()  # the unauthenticated "Start training" started nothing
