"""A training run's settings: :class:`TrainConfig`, the defaults a task fills in, and what a resume keeps."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from segkit.data.transforms import PRESETS
from segkit.engine.tracking import TRACKERS
from segkit.models.pointrend import DEFAULT_RESOLUTION, MASK_HEADS
from segkit.models.semantic import DEFAULT_SEMANTIC_MODEL, LOSSES
from segkit.tasks import TASKS, get_task


class TrainingStopped(Exception):
    """Training ended early for a reason the user must read (bad data, bad weights, NaN, Ctrl-C, OOM)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _opt(default, help_text, **kw):
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run; saved in config.json and in each checkpoint."""

    data: str = _opt("data/sample", "export to train on (any format `segkit check` reads)")
    format: str | None = _opt(None, "force the export format instead of detecting it")
    images: str | None = _opt(None, "folder holding the images, when not beside the export")
    task: str = _opt("instance", "instance (Mask R-CNN: objects) or semantic (one class per pixel)",
                     choices=list(TASKS))
    model: str | None = _opt(None, "architecture (default: maskrcnn_resnet50_fpn; with --task semantic "
                                   f"{DEFAULT_SEMANTIC_MODEL})",
                             choices=[arch for task in TASKS.values() for arch in task.architectures])
    loss: str = _opt("ce+dice", "semantic: cross-entropy plus Dice, or either alone", choices=list(LOSSES))
    weights: str = _opt("coco", "starting weights: coco (COCO, or an ImageNet backbone where torchvision has no COCO "
                                "model), imagenet, none (random init), or a .pt/.pth path: a checkpoint, a state dict, "
                                "or a backbone-only state dict (offline: ImageNet features of the backbone)")
    mask_head: str = _opt("standard", "standard (torchvision's 28x28 masks) or pointrend (refined at high "
                                      "resolution; its point head starts from random init)", choices=list(MASK_HEADS))
    mask_resolution: int = _opt(DEFAULT_RESOLUTION, "pointrend: side of the rendered mask (112, 224 or 448)")
    trainable_layers: int | None = _opt(None, "backbone stages to fine-tune (ResNet 0-5, MobileNet 0-6); default 3 with "
                                                    "pretrained weights")
    roi_batch_size: int | None = _opt(None, "sampled proposals per image for the box/mask heads (default: the "
                                            "model's: ResNet 512 as torchvision, MobileNet 128; 128 trains faster "
                                            "and is enough for small datasets)")
    epochs: int = _opt(20, "epochs to train (in total, also when resuming)")
    batch_size: int = _opt(2, "images per step per process")
    workers: int = _opt(2, "DataLoader worker processes")
    img_size: int = _opt(512, "shorter image side inside the model (torchvision's min_size)")
    train_tiles: int | None = _opt(None, "train on random crops of this many pixels at full resolution (small objects "
                                         "in large photos; validation then predicts tile by tile, as --tile does)")
    interactive_head: bool = _opt(False, "after training, also train the click-refinement head (clicks that correct "
                                         "masks in Label Studio; a few minutes on a CPU; later: segkit refiner)")
    interactive_head_steps: int = _opt(500, "training steps of the click-refinement head (500: about 5 minutes on 2 "
                                            "CPU cores)")
    aug: str = _opt("default", "augmentation preset", choices=list(PRESETS))
    optimizer: str = _opt("sgd", "sgd (momentum) or adamw", choices=["sgd", "adamw"])
    lr: float = _opt(0.01, "peak learning rate (AdamW: try 1e-4)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(1e-4, "weight decay")
    schedule: str = _opt("cosine", "decay after warm-up: cosine or step (x0.1 at 2/3 and 8/9 of training)",
                         choices=["cosine", "step"])
    warmup_iters: int = _opt(100, "linear warm-up steps (at most one epoch)")
    clip_grad: float = _opt(10.0, "clip the gradient norm to this (0: off)")
    amp: bool = _opt(True, "mixed precision on CUDA")
    val_frac: float = _opt(0.15, "fraction of images for validation when the export has no splits")
    test_frac: float = _opt(0.15, "fraction of images for testing when the export has no splits")
    limit: int | None = _opt(None, "use at most this many images per split (quick trials)")
    eval_every: int = _opt(1, "evaluate on val every N epochs (and always after the last)")
    save_interval: float = _opt(60.0, "write last.pt at most every this many seconds (and always after the last "
                                      "epoch, with a best.pt chosen on val, on Ctrl-C and on SIGTERM; 0: after every "
                                      "epoch)")
    patience: int = _opt(0, "stop after this many epochs without a better val mask AP (semantic: mIoU; 0: never)")
    score_threshold: float = _opt(0.5, "default score threshold stored in the checkpoint for predict and demo")
    seed: int = _opt(0, "random seed: runs on CPU with the same seed are identical")
    device: str | None = _opt(None, "cuda, cuda:1, cpu (default: cuda when available)")
    out: str | None = _opt(None, "run folder (default: runs/<name>, numbered so nothing is overwritten)")
    name: str = _opt("exp", "run name under runs/")
    resume: str | None = _opt(None, "continue the run of this last.pt")
    progress: bool = _opt(True, "show progress bars")
    tracker: tuple[str, ...] = _opt((), "also log to tensorboard (event files in the run folder) and/or mlflow; "
                                        "repeat the flag or separate with commas", choices=list(TRACKERS))
    mlflow_uri: str | None = _opt(None, "MLflow tracking server for --tracker mlflow (default: $MLFLOW_TRACKING_URI)")


def resolve_model(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the task's default model filled in; a model of the other task, or tiles for a semantic
    model, stop with what would work."""
    task = get_task(cfg.task)
    if cfg.interactive_head and cfg.interactive_head_steps < 1:
        raise TrainingStopped(f"--interactive-head-steps must be at least 1 (got {cfg.interactive_head_steps})",
                              exit_code=2)
    if cfg.train_tiles is not None and (cfg.task != "instance" or cfg.train_tiles < 32):
        raise TrainingStopped(f"--train-tiles is for instance models, with tiles of at least 32 px (got --task "
                              f"{cfg.task}, {cfg.train_tiles} px)", exit_code=2)
    if cfg.model is None:
        return dataclasses.replace(cfg, model=task.default_model)
    if cfg.model not in task.architectures:
        raise TrainingStopped(f"--model {cfg.model} is not a {cfg.task} model; with --task {cfg.task} choose one "
                              f"of: {', '.join(task.architectures)}", exit_code=2)
    return cfg


def resumed_config(cli: TrainConfig, saved_config: dict) -> TrainConfig:
    """The saved run's settings, except what may change on resume: epochs, patience, device, workers, progress,
    trackers, the refinement head (trained after the detector), and where the data is now (``--data``/``--images``
    of a dataset that moved: the split is saved relative to it)."""
    saved = {f.name: saved_config.get(f.name, getattr(cli, f.name)) for f in dataclasses.fields(TrainConfig)}
    keep = ("epochs", "patience", "device", "workers", "progress", "save_interval", "resume", "data", "images", "tracker",
            "mlflow_uri", "interactive_head", "interactive_head_steps")
    defaults = TrainConfig()
    changed = {k: getattr(cli, k) for k in keep if getattr(cli, k) != getattr(defaults, k)}
    return TrainConfig(**{**saved, "resume": cli.resume, **changed})
