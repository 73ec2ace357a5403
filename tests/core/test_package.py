"""segkit as a package: its public API, its console command, and a core that does not import torch."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import segkit
from tests.helpers import SAMPLE


def test_public_api():
    from segkit import Prediction, Predictor, TrainConfig, load_dataset, overlay, train

    assert segkit.__version__.count(".") == 2
    assert set(segkit.__all__) == {"__version__", "load_dataset", "Prediction", "overlay", "Predictor", "train",
                                   "TrainConfig"}
    assert callable(train) and TrainConfig().data == "data/sample"
    assert callable(overlay) and hasattr(Predictor, "from_checkpoint") and hasattr(Prediction, "from_record")
    assert len(load_dataset(SAMPLE / "val").images) == 20


def test_core_and_check_do_not_import_torch():
    code = ("import sys, segkit\n"
            "from segkit import Prediction, overlay, load_dataset\n"
            "import segkit.commands.check, segkit.data.validate, segkit.evaluation.coco, segkit.evaluation.metrics, segkit.labelstudio.preannotations\n"
            "from segkit.cli import main\n"
            f"assert main(['check', {str(SAMPLE / 'val')!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "20 images" in done.stdout


def test_console_command_is_installed():
    command = shutil.which("segkit", path=str(Path(sys.executable).parent))
    assert command, "no `segkit` command beside this Python: pip install -e . (make setup does)"
    done = subprocess.run([command, "check", str(SAMPLE / "val"), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"trainable": true' in done.stdout
    version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"segkit {segkit.__version__}"
