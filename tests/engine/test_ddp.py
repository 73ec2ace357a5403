"""torchrun with two CPU processes (gloo): one run folder, written once, whole val set evaluated once."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, free_port


def _torchrun(tiny_data: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "train.py"), "--data", str(tiny_data),
           "--weights", "none", *extra, "--img-size", "128", "--batch-size", "1", "--workers", "0",
           "--limit", "2", "--aug", "none", "--roi-batch-size", "64", "--no-progress", "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_two_processes_on_cpu(tiny_data, tmp_path):
    done = _torchrun(tiny_data, tmp_path, "--epochs", "1")
    assert "2 process(es)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]  # ranks agreed on one folder
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ddp" / "metrics.csv")))
    assert len(rows) == 1 and float(rows[0]["val_loss"]) > 0
    assert done.stdout.count("epoch 1 |") == 1  # only rank 0 reports and writes


def test_torchrun_trains_pointrend(tiny_data, tmp_path):
    """Two steps per rank: DDP fails on the second when a parameter went unused in the first."""
    _torchrun(tiny_data, tmp_path, "--epochs", "2", "--eval-every", "2", "--mask-head", "pointrend")
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ddp" / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["train_loss_mask_point"]) > 0


def test_torchrun_trains_a_mobile_model_from_a_backbone_file(tiny_data, tmp_path):
    """MobileNetV3-FPN from a backbone-only ImageNet-format file: frozen stages and frozen batch norm under DDP,
    two steps per rank (DDP fails on the second when a parameter went unused in the first)."""
    import torch
    import torchvision

    backbone = tmp_path / "mnv3_features.pth"
    torch.save(torchvision.models.mobilenet_v3_large().features.state_dict(), backbone)
    done = _torchrun(tiny_data, tmp_path, "--epochs", "2", "--eval-every", "2", "--model",
                     "maskrcnn_mobilenet_v3_large_fpn", "--weights", str(backbone))
    assert f"backbone: backbone file {backbone}" in done.stdout
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ddp" / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["train_loss"]) > 0


def test_torchrun_trains_a_semantic_model(tiny_data, tmp_path):
    """The semantic task through the same DDP path: one run folder, both epochs, val mIoU measured."""
    done = _torchrun(tiny_data, tmp_path, "--epochs", "2", "--task", "semantic", "--model", "unet_resnet18")
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ddp" / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["train_loss"]) > 0 and 0 <= float(rows[-1]["val_miou"]) <= 1
    assert done.stdout.count("epoch 2 |") == 1  # only rank 0 reports and writes



def test_two_nodes_train_one_run(tiny_data, tmp_path):
    """The README's multi-machine recipe, with both "machines" on localhost: two torchrun agents meet through
    c10d rendezvous at node 0's address, one process each, gloo; node 0 writes the run, with its checkpoint."""
    torchrun = Path(sys.executable).with_name("torchrun")
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
               str(REPO / "train.py"), "--data", str(tiny_data), "--weights", "none", "--img-size", "64",
               "--batch-size", "1", "--workers", "0", "--limit", "2", "--aug", "none", "--roi-batch-size", "64",
               "--no-progress", "--name", "nodes", "--epochs", "1"]
        nodes.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 process(es)" in logs[0]
    run = tmp_path / "node0" / "runs" / "nodes"
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert not (tmp_path / "node1" / "runs").exists()  # only the global rank 0 writes
