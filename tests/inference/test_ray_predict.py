"""segkit predict --ray: a local Ray pool of 2 CPU actors writes what one process writes, from a folder and from a
file:// URI prefix (the path an s3:// or gs:// prefix takes through pyarrow's file systems)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from segkit.cli import main
from tests.helpers import require_module
from tests.inference.test_predict_distributed import ARGS, _predict_cmd, _run

ray = require_module("ray", "pip install 'segkit[ray]'")

ROOT_URL = "/data/local-files/?d=photos/"
N_IMAGES = 6


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs for the module: starting one takes seconds, and segkit uses the one it finds."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from tests.helpers import SAMPLE

    root = tmp_path_factory.mktemp("ray") / "photos"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((SAMPLE / "val" / "images").iterdir())[-N_IMAGES:]):
        shutil.copy(src, (root / "sub" if i % 3 == 0 else root) / src.name)
    return root


@pytest.fixture(scope="module")
def one_process(untrained_checkpoint, photos) -> Path:
    out = photos.parent / "one"
    _run([*_predict_cmd(untrained_checkpoint, photos, out, None), "--image-root-url", ROOT_URL])
    return out


def _ray_predict(checkpoint: Path, source: str, out: Path) -> None:
    rc = main(["predict", *ARGS, "--ray", "--workers", "2", "--checkpoint", str(checkpoint), "--out", str(out),
               "--image-root-url", ROOT_URL, source])
    assert rc == 0


def test_ray_pool_from_a_folder_writes_what_one_process_writes(local_ray, untrained_checkpoint, photos, one_process,
                                                              tmp_path):
    out = tmp_path / "out"
    _ray_predict(untrained_checkpoint, str(photos), out)
    for name in ("predictions.json", "labelstudio.json"):
        assert (out / name).read_bytes() == (one_process / name).read_bytes(), name
    for sub in ("masks", "overlays"):
        names = sorted(p.name for p in (one_process / sub).iterdir())
        assert sorted(p.name for p in (out / sub).iterdir()) == names
        assert all((out / sub / n).read_bytes() == (one_process / sub / n).read_bytes() for n in names)


def test_ray_pool_from_a_uri_prefix(local_ray, untrained_checkpoint, photos, one_process, tmp_path):
    out = tmp_path / "out"
    _ray_predict(untrained_checkpoint, photos.resolve().as_uri() + "/", out)
    # Label Studio tasks name images by their path under the prefix: the same tasks as from the folder.
    assert (out / "labelstudio.json").read_bytes() == (one_process / "labelstudio.json").read_bytes()
    got, want = (json.loads((d / "predictions.json").read_text()) for d in (out, one_process))
    assert [im["file_name"] for im in got["images"]] == \
        [photos.resolve().as_uri() + "/" + Path(im["file_name"]).relative_to(photos).as_posix() for im in want["images"]]
    assert got["annotations"] == want["annotations"] and len(got["annotations"]) > 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(p.name for p in (one_process / "masks").iterdir())


def test_ray_pool_with_a_mobile_model_writes_what_one_process_writes(local_ray, untrained_mobile_checkpoint, photos,
                                                                    tmp_path):
    one, pool = tmp_path / "one", tmp_path / "pool"
    _run([*_predict_cmd(untrained_mobile_checkpoint, photos, one, None), "--image-root-url", ROOT_URL])
    _ray_predict(untrained_mobile_checkpoint, str(photos), pool)
    for name in ("predictions.json", "labelstudio.json"):
        assert (pool / name).read_bytes() == (one / name).read_bytes(), name
    assert json.loads((one / "predictions.json").read_text())["annotations"]  # there was something to compare
