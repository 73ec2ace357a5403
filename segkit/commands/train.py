"""``segkit train`` (and ``python train.py``): one flag per :class:`segkit.engine.trainer.TrainConfig` field.

Multi-GPU: ``torchrun --nproc_per_node=N train.py ...``; the trainer joins torchrun's process group.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator

from segkit.commands import add_key_arguments, key_from_args
from segkit.data.readers.files import DataError
from segkit.engine.tracking import TRACKERS, TrackerError, parse_names
from segkit.engine.trainer import TrainConfig, TrainingStopped, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its comment as help."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"default": f.default, "help": f.metadata["help"]}
        if f.name == "tracker":  # --tracker tensorboard --tracker mlflow, or --tracker tensorboard,mlflow
            parser.add_argument(flag, action="append", default=None, metavar="{" + ",".join(TRACKERS) + "}",
                                help=kw["help"])
            continue
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        kw["type"] = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
        parser.add_argument(flag, **kw)
    add_key_arguments(parser, " when --data is a project URL; never saved")


def run(args: argparse.Namespace) -> int:
    """Train; the exit status is 0, or TrainingStopped's (2 for unusable data or weights, 130 for Ctrl-C or
    SIGTERM)."""
    try:
        trackers, key = parse_names(args.tracker), key_from_args(args)
    except (TrackerError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = TrainConfig(**{**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)},
                         "tracker": trackers})
    try:
        with _sigterm_as_ctrl_c():
            train(cfg, api_key=key)
    except TrainingStopped as e:
        print(f"\n{e}", file=sys.stderr)
        return e.exit_code
    return 0


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM stops training as Ctrl-C does, saving last.pt where training is: it is how ``kill``, ``docker
    stop``, a cluster's preemption, torchrun (ending the other ranks) and the ML backend stop a process, and
    otherwise everything since the last ``--save-interval`` save is lost. Python lets only the main thread
    set a handler; the previous one comes back after training (``main`` may be called from a program)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
