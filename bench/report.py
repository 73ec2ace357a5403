"""A benchmark's page under docs/benchmarks/: written by the script that measured it, never by hand."""
from __future__ import annotations

import os
import platform
import shlex
from datetime import datetime, timezone
from pathlib import Path


def gpu() -> str:
    """The machine's GPU as the page names it: its CUDA device name, or ``no GPU``."""
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def write_report(path: str | os.PathLike, title: str, script: str, argv: list[str], body: str) -> Path:
    """``# title``, when and on what it ran, the command that ran it, then ``body`` (markdown)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\nWritten by `{script}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
                    f"{platform.machine()} CPU, {os.cpu_count()} cores, {gpu()}.\n\n"
                    f"    python {script} {shlex.join(argv)}\n\n{body}\n")
    print(f"report: {path}")
    return path
