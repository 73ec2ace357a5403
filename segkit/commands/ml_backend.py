"""``segkit ml-backend``: serve a checkpoint as a Label Studio ML backend (see segkit.serve.backend).

In the project's Settings > Model, connect ``http://HOST:PORT``. Settings that Label Studio's own
backends read from the environment are read here too: ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``
(to fetch task images and to retrain), ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``. It refuses to start
where strangers could use it or learn the key (see ``segkit.serve.settings.check_settings``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from segkit.commands import add_key_arguments, add_tile_arguments, key_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit ml-backend``."""
    p.add_argument("--checkpoint", default=None, help="segkit checkpoint to serve, or hf://owner/repo/file.pt (default: newest runs/*/best.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, which "
                                                        "needs BASIC_AUTH_USER/BASIC_AUTH_PASS or --no-auth)")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--no-auth", action="store_true",
                   help="listen beyond 127.0.0.1 without basic auth: only on a network you trust")
    add_key_arguments(p, ", sent only to $LABEL_STUDIO_URL, which it needs")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="a private or local host task images may come from besides Label Studio (repeatable); "
                        "public hosts are always allowed")
    p.add_argument("--max-download-mb", type=float, default=50, help="largest image download")
    p.add_argument("--cache-mb", type=float, default=2048, help="image cache size; least recently used go first")
    p.add_argument("--max-pixels", type=int, default=100_000_000,
                   help="refuse larger images, from their header (a guard against decompression bombs)")
    p.add_argument("--max-request-mb", type=float, default=32,
                   help="largest request body (Label Studio's /predict sends a page of tasks: a few MB)")
    p.add_argument("--fetch-timeout", type=float, default=60,
                   help="seconds for one request's downloads (Label Studio waits 100 s for an answer)")
    p.add_argument("--score-threshold", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--max-detections", type=int, default=100, help="most regions per image")
    add_tile_arguments(p)
    p.add_argument("--img-size", type=int, default=None, help="shorter side inside the model (default: the checkpoint's)")
    p.add_argument("--regions", choices=["auto", "polygon", "brush"], default="auto",
                   help="region type; auto: polygons when the labeling config has PolygonLabels, else brushes")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--train-every", type=int, default=0, metavar="N",
                   help="also retrain after every N new or updated annotations (0: only on 'Start training')")
    p.add_argument("--train-epochs", type=int, default=10, help="epochs of each retraining")
    p.add_argument("--train-img-size", type=int, default=None, help="image size of retraining (default: the checkpoint's)")
    p.add_argument("--train-args", default="", help="more `segkit train` options for retraining, quoted, "
                                                    "e.g. \"--batch-size 4 --lr 0.005\"")
    p.add_argument("--runs-dir", default="runs/labelstudio", help="where retraining runs go")
    p.add_argument("--prelabel-after-training", action="store_true",
                   help="after each retraining, post the new model's prediction of every task with a least-sure-first "
                        "score (as `segkit prelabel` does), so the Data Manager's order follows the new model")
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn

    from segkit.serve.backend import create_app
    from segkit.labelstudio.client import LabelStudioError
    from segkit.serve.settings import ExposureError, config_from_args
    from segkit.engine.runs import newest_best
    from segkit.models.checkpoint import CheckpointError, resolve_checkpoint

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # httpx logs every request's full URL at INFO: a signed storage link's query is a credential
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:  # hf://owner/repo/file.pt is downloaded once, here
        checkpoint = resolve_checkpoint(args.checkpoint) if args.checkpoint else newest_best(Path("runs"))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if checkpoint is None or not checkpoint.is_file():
        print(f"error: no checkpoint {'at ' + str(checkpoint) if checkpoint else 'in runs/'}; pass --checkpoint",
              file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(checkpoint, args, os.environ, api_key=key_from_args(args))
    except (ExposureError, LabelStudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
