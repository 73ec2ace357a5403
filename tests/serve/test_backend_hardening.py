"""The second round of attacks on the ML backend (issue #36), each written before its fix.

Most run the routes in this process (FastAPI's TestClient on the app ``segkit ml-backend`` and the demo
build), against the same stand-in servers as ``test_backend_attacks.py``; what needs a process of its own
(a backend killed with SIGKILL, a key kept out of ``ps``) is there.
"""
from __future__ import annotations

import io
import json
import struct
import threading
import time
import tracemalloc

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segkit.data.images import ImageError, load_scaled
from segkit.labelstudio.client import Client, LabelStudioError
from segkit.labelstudio.egress import EgressPolicy, is_public
from segkit.labelstudio.project import image_url, is_image_path
from segkit.serve.backend import add_routes, create_app, create_backend
from segkit.serve.prelabel import project_tasks
from segkit.serve.settings import BackendConfig, backend_config
from tests.serve.test_backend_attacks import CONFIG, KEY, Recorder, _jpeg, _static

LOOPBACK = "http://127.0.0.1:9090"


@pytest.fixture(scope="module")
def ls():
    """A stand-in Label Studio: images under /data/, and API routes that must never be reached by a task."""
    server = Recorder({"/data/upload/1/a.jpg": _static(_jpeg(0)),
                       "/api/projects/1/export": lambda h: (200, {}, b"[]")})
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def make_app(untrained_checkpoint, tmp_path_factory):
    """``make_app(env, **settings)``: the backend's app, as ``segkit ml-backend`` builds it, and its parts."""
    def make(env: dict | None = None, demo: bool = False, **options):
        options.setdefault("cache_dir", tmp_path_factory.mktemp("cache"))
        cfg = backend_config(untrained_checkpoint, env or {}, **options)
        if not demo:
            app = create_app(cfg)
            return TestClient(app, base_url=LOOPBACK), app
        app = FastAPI()  # the routes on someone else's app, as demo.py --ls-backend serves them on Gradio's
        backend = create_backend(cfg)
        add_routes(app, backend)
        return TestClient(app, base_url=LOOPBACK), backend
    return make


@pytest.fixture(scope="module")
def plain(make_app):
    """A backend on loopback without auth, knowing no Label Studio; its parts for the tests to look into."""
    client, backend = make_app(demo=True, max_projects=4)
    return client, backend


# --- 1. one set of HTTP rules wherever the routes are served ----------------------------------------------

@pytest.mark.parametrize("demo", [False, True], ids=["ml-backend", "demo-app"])
def test_a_rebound_dns_name_cannot_drive_the_routes(make_app, demo):
    client = make_app(demo=demo)[0]
    start = {"action": "START_TRAINING", "project": 1}
    for method, route, body in (("POST", "/webhook", start), ("POST", "/setup", {"project": 1}),
                                ("POST", "/predict", {"tasks": [], "label_config": CONFIG}), ("GET", "/versions", None)):
        answer = client.request(method, route, json=body, headers={"Host": "attacker.example:9090"})
        assert answer.status_code == 400, (route, answer.text)
    for host in ("127.0.0.1:9090", "localhost", "[::1]:9090"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_with_basic_auth_any_host_name_may_ask(make_app):
    """Behind basic auth (a Space, a server) the Host header is the proxy's business, not a guard."""
    client = make_app({"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "pw"}, demo=True)[0]
    assert client.get("/health", headers={"Host": "myspace.hf.space"}).status_code == 401
    assert client.get("/health", headers={"Host": "myspace.hf.space"}, auth=("ann", "pw")).status_code == 200


# --- 2. decoding within a budget ----------------------------------------------------------------------------

def test_a_16_bit_png_is_shrunk_before_any_full_size_copy(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((3000, 4000), 40000, np.uint16)).save(path)  # 24 MB as pixels, a few KB as a file
    tracemalloc.start()
    try:
        image, size = load_scaled(path, max_side=400)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == (4000, 3000) and image.size == (400, 300)
    assert np.asarray(image)[0, 0, 0] == round(40000 / 257)  # scaled to 8 bits, not clipped at 255
    assert peak < 8 * 2**20, peak  # float64 copies of the full image: 96 MB each


def _ico_holding(png: bytes) -> bytes:
    """An ICO whose directory says 256 x 256 and whose one entry is ``png``, whatever its real size."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # 0 x 0 means 256 x 256
    return header + entry + png


def test_containers_with_another_image_inside_are_refused(tmp_path):
    out = io.BytesIO()
    Image.new("L", (3000, 3000)).save(out, "PNG")  # 9 MP inside a header that says 0.07 MP
    path = tmp_path / "icon.ico"
    path.write_bytes(_ico_holding(out.getvalue()))
    with pytest.raises(ImageError, match="icon.ico.*format"):
        load_scaled(path, max_pixels=100_000)


def test_decodes_are_limited_across_requests(make_app, ls, monkeypatch):
    from segkit.labelstudio.project import TaskImage

    backend = make_app({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": KEY}, demo=True, decode_workers=1)[1]
    load, busy, most = TaskImage.load, [0], [0]
    lock = threading.Lock()

    def counted(self, *args, **kwargs):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            time.sleep(0.2)
            return load(self, *args, **kwargs)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(TaskImage, "load", counted)
    tasks = [{"id": 1, "data": {"img": "/data/upload/1/a.jpg"}}]
    threads = [threading.Thread(target=backend.predictions, args=(tasks, CONFIG, "1")) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


# --- 3. a project keeps its server and key ------------------------------------------------------------------

def test_a_set_up_project_cannot_be_moved_elsewhere(plain, ls):
    client, backend = plain
    first = {"project": "3.1700000000", "hostname": ls.url, "access_token": KEY, "schema": CONFIG}
    assert client.post("/setup", json=first).status_code == 200
    assert client.post("/setup", json=first).status_code == 200  # Label Studio sends it again and again
    for spelling in ("3", "03", "3.99", {"id": 3}, 3):
        answer = client.post("/setup", json={"project": spelling, "hostname": "http://attacker.example",
                                             "access_token": "theirs"})
        assert answer.status_code == 403, spelling
    assert backend.link.server("3") == (ls.url, KEY)


def test_basic_auth_lets_the_user_move_a_project(make_app, ls):
    client, backend = make_app({"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "pw"}, demo=True)
    for host in (ls.url, "http://127.0.0.2:8080"):
        answer = client.post("/setup", json={"project": 7, "hostname": host, "access_token": KEY}, auth=("ann", "pw"))
        assert answer.status_code == 200
    assert backend.link.server("7") == ("http://127.0.0.2:8080", KEY)


@pytest.mark.parametrize("project", ["../..", "3a", "1e3", "٣", -1, 1.5, True, [3], {"id": "x"}, "3.x"])
def test_project_ids_are_integers_or_refused(plain, project):
    client = plain[0]
    for route, body in (("/setup", {"schema": CONFIG}), ("/webhook", {"action": "START_TRAINING"}),
                        ("/predict", {"tasks": [], "label_config": CONFIG})):
        answer = client.post(route, json={**body, "project": project})
        assert answer.status_code == 400 and "project" in answer.json()["detail"], (route, project, answer.text)


# --- 4. any JSON gets a 4xx, never a 500 ---------------------------------------------------------------------

# leaves as odd as JSON text can carry: NaN and Infinity, integers past a float, lone surrogates ("\\ud800")
_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**308, max_value=10**330) | st.floats()
         | st.text(max_size=20) | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=3))
_json = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_number = st.floats() | st.integers() | st.integers(min_value=10**300, max_value=10**400) | _json
_region = st.fixed_dictionaries({"type": st.sampled_from(["rectanglelabels", "keypointlabels", "rectangle", "x"]),
                                 "value": st.fixed_dictionaries({k: _number for k in ("x", "y", "width", "height")},
                                                                optional={"rotation": _number}) | _json},
                                optional={"is_positive": _json})
_task = st.fixed_dictionaries({}, optional={"id": _json, "data": _json | st.dictionaries(
    st.text(max_size=5), _json | st.sampled_from(["/data/upload/1/x.jpg", "s3://b/k.jpg", "/api/projects/1",
                                                  "/data/../api"]), max_size=2)})
_body = st.fixed_dictionaries({}, optional={
    "project": _json | st.sampled_from([1, "2.17", {"id": 3}]), "tasks": _json | st.lists(_task, max_size=3),
    "label_config": _json | st.just(CONFIG), "schema": _json | st.just(CONFIG), "hostname": _json,
    "access_token": _json, "action": _json | st.sampled_from(["START_TRAINING", "ANNOTATION_CREATED"]),
    "params": st.fixed_dictionaries({"context": st.fixed_dictionaries({"result": st.lists(_region, max_size=3)})
                                                | _json}) | _json})


@pytest.fixture(scope="module")
def fuzzed(make_app):
    return make_app(demo=True)[0]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/setup", "/predict", "/webhook"]), body=_body)
def test_every_route_answers_any_json_without_a_500(fuzzed, route, body):
    raw = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: a surrogate travels as its escape
    answer = fuzzed.post(route, content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code < 500, (route, body, answer.text)
    if answer.status_code >= 400:
        assert answer.json()["detail"]


@pytest.mark.parametrize("raw", [b'{"project": 1, "hostname": "\\ud800", "access_token": "k"}',  # cannot be encoded
                                 b'{"tasks": [], "label_config": "x", "params": {"context": {"result": [{"type": '
                                 b'"keypointlabels", "value": {"x": 1e400, "y": 5}}]}}}',  # past a float
                                 b'{"project": NaN}', b'{"tasks": [{"data": {"img": "\\udfff"}}], "label_config": "c"}'])
def test_odd_json_gets_a_400(plain, raw):
    for route in ("/setup", "/predict", "/webhook"):
        answer = plain[0].post(route, content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, (route, answer.text)


# --- 5. bounded requests and caches --------------------------------------------------------------------------

def test_a_body_over_the_limit_is_refused_unread(make_app):
    client = make_app(demo=True, max_request_bytes=2**20)[0]
    big = json.dumps({"tasks": [], "label_config": "x" * 2 * 2**20}).encode()
    answer = client.post("/predict", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it comes
    answer = client.post("/predict", content=chunks, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


def test_caches_keep_a_bounded_number_of_entries(plain):
    from segkit.serve.backend import TARGETS_KEPT

    client, backend = plain
    for i in range(TARGETS_KEPT + 10):
        config = CONFIG.replace('"leaf"', f'"leaf{i}"')
        client.post("/setup", json={"project": 100 + i, "schema": config})
        client.post("/predict", json={"tasks": [], "project": 100 + i, "label_config": config})
    assert len(backend.link.schemas) <= 4 and len(backend.predictions._targets) <= TARGETS_KEPT
    added = [client.post("/setup", json={"project": 200 + i, "hostname": "http://127.0.0.1:1",
                                         "access_token": "k"}).status_code for i in range(6)]
    assert 403 in added and len(backend.link.setups) <= 4


# --- 6. pagination that ends --------------------------------------------------------------------------------

def _paging_client(page_of):
    def handle(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json={"tasks": page_of(page)})
    return Client("http://ls.test", KEY, transport=httpx.MockTransport(handle))


def test_pages_that_never_end_stop_with_a_clear_error():
    endless = _paging_client(lambda page: [{"id": page * 100 + i, "data": {}} for i in range(100)])
    with pytest.raises(LabelStudioError, match="more than 1000 tasks"):
        list(project_tasks(endless, 1, max_tasks=1000))
    assert len(list(project_tasks(endless, 1, count=250))) == 250  # the project's task count ends it
    same = _paging_client(lambda page: [{"id": i, "data": {}} for i in range(100)])
    with pytest.raises(LabelStudioError, match="page=2.*already read"):
        list(project_tasks(same, 1))


# --- 7. task references stay inside /data/ ------------------------------------------------------------------

@pytest.mark.parametrize("ref,task_id", [("/api/projects/1/export", 1), ("/data/../api/projects/1/export", 1),
                                         ("/data/%2e%2e/api/projects", 1), ("/data/%252E%252E/api/projects", 1),
                                         ("/data/..%5c..%5capi", 1), ("{ls}/api/projects/1", 1), ("{LS}/api/x", 1),
                                         ("s3://bucket/a.jpg", "../../api/projects/1"), ("s3://bucket/a.jpg", True),
                                         ("/tasks/../api/presign/", 1)])
def test_task_references_cannot_reach_the_api(ls, ref, task_id):
    with Client(ls.url, KEY) as client, pytest.raises(LabelStudioError):
        image_url(client, ref.format(ls=ls.url, LS=ls.url.upper()), task_id)


def test_image_references_label_studio_serves_are_kept(ls):
    with Client(ls.url, KEY) as client:
        for ref in ("/data/upload/1/a.jpg", "/data/local-files/?d=photos/a.jpg", f"{ls.url}/data/upload/1/a.jpg",
                    "/tasks/5/presign/?fileuri=czM6Ly9i", "https://cdn.example/a.jpg"):
            assert image_url(client, ref, 5) == ref
        assert image_url(client, "s3://bucket/a.jpg", 5).startswith("/tasks/5/presign/?fileuri=")
    with Client(f"{ls.url}/ls", KEY) as client:  # Label Studio under a path
        assert image_url(client, f"{ls.url}/ls/data/upload/1/a.jpg", 5)
    assert not is_image_path("/data/./x") and is_image_path("/data/upload/1/a.jpg")


def test_a_task_pointing_at_the_api_gets_no_request_with_the_key(make_app, ls):
    client = make_app({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": KEY}, demo=True)[0]
    tasks = [{"id": 1, "data": {"img": "/api/projects/1/export"}}, {"id": 2, "data": {"img": "/data/upload/1/a.jpg"}}]
    answer = client.post("/predict", json={"tasks": tasks, "project": 1, "label_config": CONFIG})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert results[0]["result"] == [] and results[1]["result"]
    assert not [p for p, _ in ls.seen if p.startswith("/api/")]


# --- 8. one cache cap per server; NAT64/SIIT; the connection goes where the check said ----------------------

def test_spellings_of_one_server_share_one_cache(make_app, ls):
    client, backend = make_app(demo=True)
    port = ls.url.rsplit(":", 1)[1]
    for project, host in ((11, ls.url), (12, f"HTTP://127.0.0.1:{port}/"), (13, f"http://127.0.0.1:{port}/.")):
        assert client.post("/setup", json={"project": project, "hostname": host, "access_token": KEY}).status_code \
            == 200
    assert len({backend.predictions._cache(p).folder for p in ("11", "12", "13")}) == 1


@pytest.mark.parametrize("address", ["64:ff9b:1:c0a8:1:100::", "64:ff9b:1::c0a8:101", "64:ff9b:1:a00:1::",
                                     "::ffff:0:c0a8:101", "::ffff:0:7f00:1", "::ffff:0:a9fe:a9fe"])
def test_translation_prefixes_count_as_the_ipv4_they_embed(address):
    assert not is_public(address)


def test_the_connection_goes_to_the_address_that_was_checked(ls):
    """DNS rebinding: the name is public when checked and private when connected. Resolved once, the
    public answer is where the socket goes (unreachable here); the private server never hears of it."""
    calls = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["8.8.8.8"]  # what the check hears; the system's resolver says 127.0.0.1

    policy = EgressPolicy(None, frozenset(), rebinding)
    port = ls.url.rsplit(":", 1)[1]
    before = len(ls.seen)
    with Client("http://label-studio.invalid", "-", timeout=2, request_hook=policy.hook,
                transport=policy.transport()) as client, pytest.raises(LabelStudioError):
        client.download(f"http://localhost:{port}/data/upload/1/a.jpg", 2**20)  # localhost: 127.0.0.1 to the OS
    assert len(ls.seen) == before and calls


# --- 9. the key off the command line ---------------------------------------------------------------------------

def test_a_key_file_is_read_and_a_bad_one_named(tmp_path):
    import argparse

    from segkit.commands import add_key_arguments, key_from_args

    parser = argparse.ArgumentParser()
    add_key_arguments(parser)
    (tmp_path / "key").write_text(f"  {KEY}\n")
    assert key_from_args(parser.parse_args(["--ls-token-file", str(tmp_path / "key")])) == KEY
    (tmp_path / "empty").write_text("\n")
    for name in ("empty", "missing"):
        with pytest.raises(LabelStudioError, match=name):
            key_from_args(parser.parse_args(["--ls-token-file", str(tmp_path / name)]))
    assert key_from_args(parser.parse_args([])) is None


def test_retraining_is_made_as_the_served_model_was(tmp_path):
    """"Start training" trains the new model like the served one: a tile-trained model on tiles again."""
    from segkit.serve.backend import retrain_command

    cfg = BackendConfig(checkpoint=tmp_path / "best.pt", runs_dir=tmp_path, cache_dir=tmp_path, label_studio_url=None,
                        api_key=None)
    ckpt = {"arch": "maskrcnn_mobilenet_v2_fpn", "img_size": 384, "score_threshold": 0.4,
            "config": {"train_tiles": 512}}
    cmd = retrain_command(ckpt, tmp_path / "best.pt", "http://ls/projects/3", cfg, tmp_path / "run")
    assert " ".join(cmd[cmd.index("--data"):]).startswith(
        f"--data http://ls/projects/3 --weights {tmp_path / 'best.pt'} --model maskrcnn_mobilenet_v2_fpn "
        "--task instance --img-size 384 --score-threshold 0.4 --train-tiles 512 --epochs")
    assert "--train-tiles" not in retrain_command({**ckpt, "config": {}}, tmp_path / "best.pt", "d", cfg, tmp_path)
