"""The ML backend's settings (:class:`BackendConfig`) and the rules that keep it closed to strangers.

Built in one place from a command line and the environment (:func:`config_from_args`), for both
``segkit ml-backend`` and ``demo.py --ls-backend``: the same flags and variables mean the same there.
No FastAPI and no model here, so a command can check its settings before importing either.
"""
from __future__ import annotations

import argparse
import ipaddress
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segkit.data.images import DEFAULT_MAX_PIXELS
from segkit.labelstudio.client import API_KEY_ENV
from segkit.labelstudio.project import DEFAULT_MAX_DOWNLOAD

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


@dataclass
class BackendConfig:
    """How the backend predicts, reaches Label Studio and retrains (``segkit ml-backend --help``)."""

    checkpoint: Path
    score_threshold: float | None = None  # None: the checkpoint's
    max_detections: int = 100
    img_size: int | None = None  # None: the checkpoint's
    regions: str = "auto"  # auto (polygons when the config has both), polygon or brush
    device: str | None = None
    label_studio_url: str | None = None  # default $LABEL_STUDIO_URL, else what /setup says
    api_key: str | None = None  # default $LABEL_STUDIO_API_KEY, else what /setup says
    basic_auth: tuple[str, str] | None = None
    train_every: int = 0  # retrain after this many new/updated annotations (0: only on "Start training")
    train_epochs: int = 10
    train_img_size: int | None = None  # None: the checkpoint's
    train_args: list[str] = field(default_factory=list)  # more `segkit train` options
    runs_dir: Path = Path("runs/labelstudio")
    cache_dir: Path | None = None
    allow_hosts: list[str] = field(default_factory=list)  # private hosts images may come from, besides Label Studio
    max_download: int = DEFAULT_MAX_DOWNLOAD  # bytes of one image download
    cache_bytes: int | None = 2 * 2**30  # the image cache's cap (least recently used go first; None: no cap)
    fetch_timeout: float = 60.0  # seconds for all of one request's downloads: Label Studio gives up at 100
    fetch_workers: int = 4  # downloads at once per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header (decompression bombs)
    prompt_cache: int = 8  # images whose features are kept for further prompts (~90-105 MB each at 800 px)
    prelabel_after_training: bool = False  # post the new model's predictions of every task after each retraining
    host: str = "127.0.0.1"  # where it listens: on loopback without auth, only loopback Host names are answered
    max_request_bytes: int = 32 * 2**20  # a request body (Label Studio's /predict: a page of tasks, a few MB)
    max_projects: int = 1000  # projects /setup may name (each keeps its server and key) and label configs kept
    decode_workers: int = 2  # images decoded at once, all requests together: each may take hundreds of MB
    download_workers: int = 16  # image downloads at once, all requests together
    tile: int | str | None = None  # sliced inference of images larger than this, or "auto" (segkit.inference.tiles)
    tile_overlap: float = 0.25


class ExposureError(ValueError):
    """The backend would be reachable by strangers, or would send a key where the user did not send it."""


# Command-line option (argparse dest) -> (BackendConfig field, conversion; None: as it is). A command that lacks
# an option (the demo has only a few) leaves that field at its default.
ARG_FIELDS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "score_threshold": ("score_threshold", None),
    "max_detections": ("max_detections", None),
    "img_size": ("img_size", None),
    "regions": ("regions", None),
    "device": ("device", None),
    "train_every": ("train_every", None),
    "train_epochs": ("train_epochs", None),
    "train_img_size": ("train_img_size", None),
    "train_args": ("train_args", shlex.split),
    "runs_dir": ("runs_dir", Path),
    "allow_host": ("allow_hosts", None),
    "max_download_mb": ("max_download", lambda mb: int(mb * 2**20)),
    "cache_mb": ("cache_bytes", lambda mb: int(mb * 2**20)),
    "fetch_timeout": ("fetch_timeout", None),
    "max_pixels": ("max_pixels", None),
    "prelabel_after_training": ("prelabel_after_training", None),
    "max_request_mb": ("max_request_bytes", lambda mb: int(mb * 2**20)),
    "tile": ("tile", None),
    "tile_overlap": ("tile_overlap", None),
}


def config_from_args(checkpoint: Path, args: argparse.Namespace, env: Mapping[str, str],
                     host: str | None = None, api_key: str | None = None) -> BackendConfig:
    """The settings ``args`` (options of ``segkit ml-backend``, see :data:`ARG_FIELDS`) and ``env`` give,
    checked for listening on ``host`` (default ``args.host``) with ``args.no_auth``; ``api_key`` (from
    ``--ls-token-file``) before the environment's.

    Raises ExposureError when they would open the backend to strangers or send the key astray.
    """
    options = {name: getattr(args, dest) if convert is None else convert(getattr(args, dest))
               for dest, (name, convert) in ARG_FIELDS.items() if hasattr(args, dest)}
    host = args.host if host is None else host
    cfg = backend_config(checkpoint, env, host=host, api_key=api_key, **options)
    check_settings(cfg, host, getattr(args, "no_auth", False))
    return cfg


def backend_config(checkpoint: Path, env: Mapping[str, str], **options: Any) -> BackendConfig:
    """The backend's settings: ``options`` (BackendConfig fields) plus Label Studio's variables from ``env``
    (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``)."""
    return BackendConfig(checkpoint=checkpoint, label_studio_url=env.get("LABEL_STUDIO_URL") or None,
                         api_key=options.pop("api_key", None) or env.get(API_KEY_ENV) or None,
                         basic_auth=basic_auth_from_env(env), **options)


def check_settings(cfg: BackendConfig, host: str, no_auth: bool = False) -> None:
    """Refuse to start a backend that others could use, or that could hand the key to them.

    A key from the environment or ``--ls-token-file`` is only ever sent to ``LABEL_STUDIO_URL``, so it
    needs one; and anything but loopback needs basic auth (or ``--no-auth``, said on purpose, for a
    trusted network): whoever reaches the port can otherwise retrain, swap the model and make the
    backend fetch addresses on its network.
    """
    if cfg.api_key and not cfg.label_studio_url:
        raise ExposureError(f"{API_KEY_ENV} is set but LABEL_STUDIO_URL is not: set LABEL_STUDIO_URL to your Label "
                            f"Studio's address (e.g. http://localhost:8080), the only place the key is sent")
    if not cfg.basic_auth and not no_auth and not is_loopback(host):
        raise ExposureError(f"refusing to listen on {host} without credentials: anyone who reaches the port could "
                            f"retrain and replace the model. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same "
                            f"in Label Studio's model settings), listen on 127.0.0.1, or pass --no-auth on a "
                            f"trusted network")


def trusted_host_names(cfg: BackendConfig) -> list[str] | None:
    """The Host names the routes answer (None: any). A backend on loopback without auth answers only
    loopback names, so that a web page cannot reach it through a DNS name rebound to 127.0.0.1."""
    return LOOPBACK_NAMES if cfg.basic_auth is None and is_loopback(cfg.host) else None


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:9090`` -> ``[::1]``, ``Localhost:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.split(":", 1)[0]


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the port to this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def basic_auth_from_env(env: Mapping[str, str]) -> tuple[str, str] | None:
    """``(BASIC_AUTH_USER, BASIC_AUTH_PASS)``, None when neither is set; one without the other is refused,
    since silently serving without auth is what the user tried to prevent."""
    user, password = env.get("BASIC_AUTH_USER") or "", env.get("BASIC_AUTH_PASS") or ""
    if bool(user) != bool(password):
        missing = "BASIC_AUTH_PASS" if user else "BASIC_AUTH_USER"
        raise ExposureError(f"{missing} is not set: basic auth needs both BASIC_AUTH_USER and BASIC_AUTH_PASS")
    return (user, password) if user else None
