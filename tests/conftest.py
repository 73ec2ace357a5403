"""Shared fixtures. One tiny model is trained once per session and shared by every test that needs one.

Training from random init on 4 images is not the same run on every machine: CPU kernels, thread counts and
library versions change the sums, and a few steps turn that into different models. So the fixtures train
until the model has learned what the tests rely on (checked on the metrics training itself records), in
chunks up to a cap, and fail naming the metric reached when it never does. ``SEGKIT_TEST_SEED`` picks the
seed, to show the suite passes on others than 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import (EXPORT_MAX_DETECTIONS, EXPORT_SUFFIX, MORE_EPOCHS, REFINER_STEPS, REPO, SAMPLE, SHARED, TINY_IMAGES,
                           overfit_config, tiny_config, write_subset)

SEMANTIC_EPOCHS = 40  # x 2 steps of AdamW: U-Net R18 from random init learns the 4 images
MAX_CHUNKS = 6  # extensions of a fixture's training before it gives up
ARTIFACTS = REPO / "test-artifacts"


def train_until(cfg, reached: Callable[[dict], bool], more: int = MORE_EPOCHS, chunks: int = MAX_CHUNKS) -> dict:
    """Train ``cfg``, then resume it ``more`` epochs at a time until ``reached(best metrics)``: the summary,
    with the epochs it took. Fails, naming what was reached, when ``chunks`` extensions are not enough."""
    from segkit.engine.trainer import train

    summary = train(cfg)
    for _ in range(chunks):
        if reached(summary["best_metrics"]):
            return {**summary, "epochs": cfg.epochs}
        cfg = dataclasses.replace(cfg, epochs=cfg.epochs + more, resume=summary["last"])
        summary = train(cfg)
    if not reached(summary["best_metrics"]):
        pytest.fail(f"the fixture's training did not reach its target in {cfg.epochs} epochs (seed {cfg.seed}); "
                    f"best val metrics: {summary['best_metrics']}")
    return {**summary, "epochs": cfg.epochs}


def record_fixture(name: str, summary: dict, seed: int) -> dict:
    """Append what a fixture's training reached to test-artifacts/fixtures.jsonl: the spread over seeds,
    thread counts and machines is read from there (README, Tests)."""
    ARTIFACTS.mkdir(exist_ok=True)
    row = {"fixture": name, "seed": seed, "threads": os.environ.get("OMP_NUM_THREADS"), "epochs": summary["epochs"],
           **{k: round(v, 4) for k, v in summary["best_metrics"].items() if k.startswith("val_") and "loss" not in k}}
    with open(ARTIFACTS / "fixtures.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return summary


def learned_instances(metrics: dict) -> bool:
    """Every class found and outlined: mask AP50 >= 0.9 and each class's mask AP >= 0.3 on the 4 images."""
    per_class = [v for k, v in metrics.items() if k.startswith("val_segm_ap_")]
    return metrics.get("val_segm_map50", 0) >= 0.9 and len(per_class) == 3 and min(per_class) >= 0.3


def learned_pixels(metrics: dict) -> bool:
    """Every class painted: mIoU >= 0.85 on the 4 images."""
    return metrics.get("val_miou", 0) >= 0.85


# pytest-xdist (make test runs ``-n auto``): each worker is a process of its own, so the cores are shared out
# between them instead of every worker's torch spreading over all of them and fighting for them. An
# OMP_NUM_THREADS set by the user wins.
def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # and for the processes the tests start
        import torch

        torch.set_num_threads(threads)


TRAINED = ("overfit_run", "semantic_overfit_run")  # the session's trainings, each made once (``made_once``)
STARTERS = ("test_trainer.py", "test_semantic.py")  # the modules whose tests train them first
# the modules that take a worker 40 s or more (make test's timings, 2 cores): they go before all the short ones,
# so that the short ones fill the end evenly instead of one long module running alone after the others are done
# (test_labelstudio_server.py, 160 s, ran last on its worker in 2 of 3 runs: a minute with one worker idle)
LONG = ("test_labelstudio_server.py", "test_mobile_models.py", "test_ddp.py", "test_ray_predict.py", "test_export.py", "test_tracking.py",
        "test_backend_attacks.py", "test_backend_hardening.py", "test_predict_distributed.py", "test_space.py",
        "test_atomic.py")


# besides LONG and the tests that need a trained model: modules whose tests each train, export or start
# a server (make test's timings: 15 s or more on a worker)
SLOW = ("test_labelstudio.py", "test_demo.py", "test_prelabel.py", "test_predict_command.py",
        "test_evaluate_command.py", "test_pointrend.py", "test_model.py", "test_mobile_weights.py", "test_semantic.py",
        "test_trainer.py", "test_large_images.py", "test_model_card.py", "test_sample.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order modules so that no pytest-xdist worker waits on another's training and none runs on alone: the two
    that train the shared fixtures first (the worker that takes each trains it), then the long modules, then
    the short ones; in each group those that need no trained model before those that do, the long ones longest
    first.
    Within a starter, its tests that ask for a training directly go first. Plain pytest runs the same order."""
    need_a_model = {item.path.name for item in items if set(TRAINED) & set(item.fixturenames)}

    def rank(module: str) -> tuple[int, int, int]:
        if module in STARTERS:
            return (STARTERS.index(module), 0, 0)
        long = LONG.index(module) if module in LONG else len(LONG)
        return (len(STARTERS) + (module not in LONG), module in need_a_model, long)

    def trains_later(item: pytest.Item) -> bool:
        return item.path.name in STARTERS and not set(TRAINED) & set(item._fixtureinfo.argnames)

    items.sort(key=lambda item: (rank(item.path.name), trains_later(item)))
    for item in items:  # `pytest -m "not slow"`: the quick check, without trainings, servers and long modules
        if item.path.name in LONG or item.path.name in SLOW or set(TRAINED) & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def made_once(name: str, tmp_path_factory: pytest.TempPathFactory, make: Callable[[], dict]) -> dict:
    """``make()``, once per session even under pytest-xdist, where each worker has its own session fixtures:
    the first worker to ask makes it holding a lock, the others wait and read its JSON (xdist's pattern).
    A failure is recorded too: the other workers report it at once instead of each trying the training again
    (one full disk once cost CI 90 minutes of such retries)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make()
    done = tmp_path_factory.getbasetemp().parent / f"{name}.json"
    with FileLock(f"{done}.lock"):
        if not done.is_file():
            try:
                result = make()
            except Exception as error:  # not pytest's skip (a BaseException): each worker decides that itself
                done.write_text(json.dumps({"_made_once_failed": f"{type(error).__name__}: {error}"}))
                raise
            done.write_text(json.dumps(result))
            return result
        result = json.loads(done.read_text())
    if "_made_once_failed" in result:
        failure = result["_made_once_failed"]
        pytest.fail(f"session fixture {name!r} failed on another worker: {failure}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_realdata() -> Path:
    path = SHARED / "realdata"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (team-only real exports)")
    return path


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory) -> Path:
    """A random-init checkpoint in segkit's format: fast, for tests that only need a loadable model. Written
    once per session, so that every worker's tests (and the exports made from it) see the same model."""
    return _untrained("maskrcnn_resnet50_fpn", "untrained_checkpoint", tmp_path_factory)


@pytest.fixture(scope="session")
def untrained_mobile_checkpoint(tmp_path_factory) -> Path:
    """The same for the mobile architecture (MobileNetV3-Large FPN)."""
    return _untrained("maskrcnn_mobilenet_v3_large_fpn", "untrained_mobile_checkpoint", tmp_path_factory)


def _untrained(arch: str, name: str, tmp_path_factory) -> Path:
    def make() -> dict:
        import torch

        from segkit.models.checkpoint import save_checkpoint
        from segkit.tasks.checkpoint import make_checkpoint
        from segkit.models.mask_rcnn import build_model

        torch.manual_seed(0)
        classes = ["leaf", "pebble", "shell"]
        model = build_model(arch, len(classes) + 1, weights=None, img_size=128)
        path = tmp_path_factory.mktemp(name) / "untrained.pt"
        save_checkpoint(make_checkpoint(model, arch, classes, img_size=128, score_threshold=0.05), path)
        return {"path": str(path)}

    return Path(made_once(name, tmp_path_factory, make)["path"])


@pytest.fixture
def hub_downloads(untrained_checkpoint, monkeypatch) -> list[tuple[str, str]]:
    """There is no internet here: huggingface_hub's download answers every ``hf://`` checkpoint with the
    untrained one. The list fills with the (repo_id, filename) asked for."""
    import huggingface_hub

    calls = []

    def download(repo_id: str, filename: str) -> str:
        calls.append((repo_id, filename))
        return str(untrained_checkpoint)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


@pytest.fixture(scope="session")
def exported(untrained_checkpoint, tmp_path_factory) -> Callable[[str], Path]:
    """``exported(fmt)``: ``segkit export`` of the untrained checkpoint to ``fmt``, made once per session (an
    ONNX or OpenVINO export of Mask R-CNN takes many seconds) in a folder of its own with its companion files.
    Tests that change an artifact copy its folder first."""
    made: dict[str, Path] = {}

    def export(fmt: str) -> Path:
        def make() -> dict:
            from segkit.cli import main

            out = tmp_path_factory.mktemp(f"export-{fmt}") / f"model{EXPORT_SUFFIX[fmt]}"
            assert main(["export", "--checkpoint", str(untrained_checkpoint), "--format", fmt, "--out", str(out),
                         "--max-detections", str(EXPORT_MAX_DETECTIONS)]) == 0
            return {"path": str(out)}

        if fmt not in made:
            made[fmt] = Path(made_once(f"exported_{fmt}", tmp_path_factory, make)["path"])
        return made[fmt]

    return export


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 sample images with every class several times, as train and val."""
    return write_subset(SAMPLE / "train", tmp_path_factory.mktemp("tiny") / "data", 4, names=TINY_IMAGES)


@pytest.fixture(scope="session")
def overfit_run(tiny_data, tmp_path_factory) -> dict:
    """Train from random init on the 4 tiny images until it has learned them (4.8 and 5.0 minutes on one
    worker of ``make test`` beside the other in the last two fresh clones; more on a slower day)."""
    def make() -> dict:
        cfg = overfit_config(tiny_data, tmp_path_factory.mktemp("overfit") / "run")
        return record_fixture("overfit_run", train_until(cfg, learned_instances), cfg.seed)

    return made_once("overfit_run", tmp_path_factory, make)


@pytest.fixture(scope="session")
def trained_checkpoint(overfit_run) -> Path:
    """best.pt of a tiny model overfit on 4 sample images: its predictions match their ground truth."""
    return Path(overfit_run["best"])


@pytest.fixture(scope="session")
def refined_checkpoint(trained_checkpoint, tmp_path_factory):
    """The overfit fixture's best.pt with a refinement head trained on its train images."""
    from segkit.data.dataset import SegmentationDataset
    from segkit.data.readers import load_dataset
    from segkit.engine.refiner import RefinerConfig, add_refiner
    from segkit.models.checkpoint import load_checkpoint, save_checkpoint

    def make() -> dict:
        ckpt = load_checkpoint(trained_checkpoint)
        records = load_dataset(ckpt["config"]["data"]).images
        losses = []
        refined = add_refiner(ckpt, SegmentationDataset(records, ckpt["classes"]), RefinerConfig(steps=REFINER_STEPS),
                              progress=lambda step, loss: losses.append(loss))
        path = tmp_path_factory.mktemp("refined") / "best.pt"
        save_checkpoint({k: v for k, v in refined.items() if k != "segkit_version"}, path)
        return {"path": str(path), "losses": losses, "data": ckpt["config"]["data"]}

    return made_once("refined_checkpoint", tmp_path_factory, make)


@pytest.fixture(scope="session")
def semantic_overfit_run(tiny_data, tmp_path_factory) -> dict:
    """``--task semantic``: a U-Net (ResNet-18) from random init, overfit on the 4 tiny images at 128 px."""
    def make() -> dict:
        cfg = tiny_config(tiny_data, tmp_path_factory.mktemp("semantic") / "run", task="semantic",
                          model="unet_resnet18", optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=SEMANTIC_EPOCHS,
                          eval_every=SEMANTIC_EPOCHS // 2, warmup_iters=5)
        summary = train_until(cfg, learned_pixels, more=SEMANTIC_EPOCHS // 2)
        return {**record_fixture("semantic_overfit_run", summary, cfg.seed), "arch": cfg.model}

    return made_once("semantic_overfit_run", tmp_path_factory, make)


@pytest.fixture(scope="session")
def semantic_checkpoint(semantic_overfit_run) -> Path:
    """best.pt of the semantic overfit run."""
    return Path(semantic_overfit_run["best"])


@pytest.fixture(scope="module")
def gradio_client_downloads(tmp_path_factory) -> Iterator[Path]:
    """gradio_client downloads each result through a folder it makes in the temp dir and never removes
    (``Client._download_file``: ``secrets.token_hex(20)``): the empty 40-hex-digit folders a run left in /tmp.
    Modules that call a Gradio app send them to a folder of pytest's, which it cleans up."""
    folder = tmp_path_factory.mktemp("gradio-client")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder
