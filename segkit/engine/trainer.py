"""Fine-tune Mask R-CNN (or, with ``--task semantic``, a semantic model) on an export: :class:`TrainConfig`
and :func:`train` (``python train.py`` runs them).

Reads and validates the data, splits it, trains with warm-up and cosine (or step) decay, evaluates
COCO AP (semantic: mIoU) every epoch, writes metrics.csv, curves, MODEL_CARD.md and best/last checkpoints to
``runs/<name>/`` (and to TensorBoard or MLflow with ``--tracker``), and resumes exactly from ``last.pt``.
Under ``torchrun`` it trains with DistributedDataParallel.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from segkit.engine import loops as engine, model_card, runs, semantic, tracking
from segkit.atomic import write_json
from segkit.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from segkit.engine.coco import records_to_coco
from segkit.models.mask_rcnn import (ARCHITECTURES, DEFAULT_TRAINABLE_LAYERS, WeightsError, build_model, checkpoint_classes,
                          count_parameters, freeze_backbone, is_pretrained, uses_frozen_bn)
from segkit.models.pointrend import DEFAULT_RESOLUTION, MASK_HEADS
from segkit.data.records import class_key
from segkit.models.semantic import DEFAULT_SEMANTIC_MODEL, LOSSES, SEMANTIC_ARCHITECTURES, build_semantic_model
from segkit.data.splits import SPLITS, SplitError, restore_split, split_paths, split_records
from segkit.data.transforms import PRESETS


def _opt(default, help_text, **kw):
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run; saved in config.json and in each checkpoint."""

    data: str = _opt("data/sample", "export to train on (any format `segkit check` reads)")
    format: str | None = _opt(None, "force the export format instead of detecting it")
    images: str | None = _opt(None, "folder holding the images, when not beside the export")
    task: str = _opt("instance", "instance (Mask R-CNN: objects) or semantic (one class per pixel)",
                     choices=list(semantic.TASKS))
    model: str | None = _opt(None, "architecture (default: maskrcnn_resnet50_fpn; with --task semantic "
                                   f"{DEFAULT_SEMANTIC_MODEL})", choices=[*ARCHITECTURES, *SEMANTIC_ARCHITECTURES])
    loss: str = _opt("ce+dice", "semantic: cross-entropy plus Dice, or either alone", choices=list(LOSSES))
    weights: str = _opt("coco", "starting weights: coco, none (random init) or a .pt/.pth path")
    mask_head: str = _opt("standard", "standard (torchvision's 28x28 masks) or pointrend (refined at high "
                                      "resolution; its point head starts from random init)", choices=list(MASK_HEADS))
    mask_resolution: int = _opt(DEFAULT_RESOLUTION, "pointrend: side of the rendered mask (112, 224 or 448)")
    trainable_layers: int | None = _opt(None, "ResNet stages to fine-tune (0-5); default 3 with pretrained weights")
    roi_batch_size: int = _opt(512, "sampled proposals per image for the box/mask heads (torchvision: 512; "
                                    "128 trains faster and is enough for small datasets)")
    epochs: int = _opt(20, "epochs to train (in total, also when resuming)")
    batch_size: int = _opt(2, "images per step per process")
    workers: int = _opt(2, "DataLoader worker processes")
    img_size: int = _opt(512, "shorter image side inside the model (torchvision's min_size)")
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
    patience: int = _opt(0, "stop after this many epochs without a better val mask AP (semantic: mIoU; 0: never)")
    score_threshold: float = _opt(0.5, "default score threshold stored in the checkpoint for predict and demo")
    seed: int = _opt(0, "random seed: runs on CPU with the same seed are identical")
    device: str | None = _opt(None, "cuda, cuda:1, cpu (default: cuda when available)")
    out: str | None = _opt(None, "run folder (default: runs/<name>, numbered so nothing is overwritten)")
    name: str = _opt("exp", "run name under runs/")
    resume: str | None = _opt(None, "continue the run of this last.pt")
    progress: bool = _opt(True, "show progress bars")
    tracker: tuple[str, ...] = _opt((), "also log to tensorboard (event files in the run folder) and/or mlflow; "
                                        "repeat the flag or separate with commas", choices=list(tracking.TRACKERS))
    mlflow_uri: str | None = _opt(None, "MLflow tracking server for --tracker mlflow (default: $MLFLOW_TRACKING_URI)")


class TrainingStopped(Exception):
    """Training ended early for a reason the user must read (bad data, bad weights, NaN, Ctrl-C, OOM)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def train(cfg: TrainConfig, api_key: str | None = None) -> dict:
    """Run (or resume) training; return a summary with the run folder, best metrics and paths.

    ``api_key`` is for a Label Studio project URL as ``cfg.data`` (default ``$LABEL_STUDIO_API_KEY``);
    it is never saved.

    Raises :class:`TrainingStopped` when it cannot start or has to stop early; ``last.pt`` then holds
    what can be resumed.
    """
    rank, world, local_rank = _setup_distributed()
    try:
        run = _setup(cfg, rank, world, local_rank, api_key)
        with run.tracker:  # closes the trackers' run as finished, failed or killed
            _train_epochs(run)
            summary = _finish(run) if run.main else {}
        _barrier(world)
        return summary
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything one training run holds, built by :func:`_setup` and advanced by :func:`_train_epochs`."""

    cfg: TrainConfig
    out: Path
    main: bool  # rank 0: writes files and evaluates
    world: int
    device: torch.device
    classes: list[str]
    splits: dict[str, list]
    loaders: dict[str, DataLoader]
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, wrapped in DDP when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ground_truth: dict[str, dict]  # COCO ground truth of val and test (rank 0 only), made once
    history: list[dict]
    data_source: dict | None = None  # a live Label Studio project: server, project, export time
    start_epoch: int = 0
    start_step: int = 0  # batches of start_epoch already trained before an interruption
    resume_rng: dict | None = None
    step: int = 0  # batches of the current epoch trained so far
    tracker: tracking.Trackers = field(default_factory=tracking.Trackers)  # rank 0's --tracker; none elsewhere

    def checkpoint(self, **extra) -> dict:
        """The model's checkpoint with this run's description (``extra``: epoch, metrics, resume state)."""
        return make_checkpoint(self.model, self.cfg.model, self.classes, self.cfg.img_size, self.cfg.score_threshold,
                               _frozen_bn(self.cfg), task=self.cfg.task, config=dataclasses.asdict(self.cfg),
                               split=split_paths(self.splits, self.cfg.data), data_source=self.data_source, **extra)

    def resumable(self, epoch_done: int, step: int) -> dict:
        """last.pt: the checkpoint plus everything needed to continue exactly where training is."""
        return self.checkpoint(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                               scaler=self.scaler.state_dict(), epoch=epoch_done, step=step,
                               history=self.history[:epoch_done], rng=_rng_state(),
                               metrics=self.history[-1] if self.history else {})


def _setup(cfg: TrainConfig, rank: int, world: int, local_rank: int, api_key: str | None = None) -> _Run:
    """Read and split the data, build model, loaders and optimizer, restore a resumed run; print a summary."""
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        cfg = _resumed_config(cfg, resume)
    cfg = resolve_model(cfg)
    device = _pick_device(cfg.device, local_rank)
    main = rank == 0
    # A live Label Studio project is fetched once per machine: each machine's first process fills the image
    # cache (on that machine's disk), the others then read it
    if local_rank != 0:
        _barrier(world)
    records = _load_data(cfg, verbose=main, api_key=api_key)
    if local_rank == 0:
        _barrier(world)
    classes = resume["classes"] if resume else records.classes
    try:
        splits = restore_split(records.images, resume["split"], cfg.data) if resume else split_records(
            records.images, cfg.val_frac, cfg.test_frac, cfg.seed)
    except SplitError as e:
        raise TrainingStopped(f"cannot resume: {e}") from None
    if cfg.limit:
        splits = {k: v[: cfg.limit] for k, v in splits.items()}
    if not splits["train"]:
        raise TrainingStopped(f"{cfg.data}: no training images after splitting {len(records.images)} images")
    out = Path(cfg.out) if cfg.out else runs.next_run_dir(Path("runs"), cfg.name, main, world)
    cfg = dataclasses.replace(cfg, out=str(out))

    _seed_everything(cfg.seed)
    loaders = _make_loaders(cfg, splits, classes, world, rank)
    model = _make_model(cfg, classes, resumed=resume is not None).to(device)
    optimizer, scheduler, scaler = _make_optimization(cfg, model, len(loaders["train"]), device)
    if resume:
        for part, obj in (("model", model), ("optimizer", optimizer), ("scaler", scaler)):
            obj.load_state_dict(resume[part])
        # The step count is restored, the schedule's shape is this run's: resuming with more --epochs stretches
        # the decay over them, where the saved shape would train on at its end (a learning rate of 0 for cosine)
        scheduler.load_state_dict({**resume["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)  # what the saved step would use (the same, unstretched)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ground_truth = {s: records_to_coco(splits[s], classes) for s in ("val", "test")
                    if main and splits[s] and cfg.task == "instance"}
    run = _Run(cfg, out, main, world, device, classes, splits, loaders, model, train_model, optimizer, scheduler,
               scaler, ground_truth, history=[], data_source=records.origin)
    if resume:
        run.history, run.start_epoch, run.start_step = resume["history"], resume["epoch"], resume.get("step", 0)
        run.resume_rng = resume.get("rng")
    if main:
        write_json(out / "config.json", dataclasses.asdict(cfg), indent=2)
        write_json(out / "split.json", split_paths(splits, cfg.data), indent=2)
        if records.origin:
            write_json(out / "data_source.json", records.origin, indent=2)
        if not resume and (carried := _carried_heads(cfg.weights, classes)):
            print(carried)
        run.tracker = _open_trackers(cfg, out, resumed=resume is not None)
        trainable, total = count_parameters(model)
        print(f"segkit: {cfg.model} ({trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters trainable), "
              f"{len(classes)} classes {classes}, images train/val/test = "
              f"{'/'.join(str(len(splits[s])) for s in SPLITS)}, device {device}, "
              f"{world} process(es) -> {out}")
    return run


def _train_epochs(run: _Run) -> None:
    """The epoch loop; an interruption or a failure leaves a resumable last.pt and raises TrainingStopped."""
    cfg, out = run.cfg, run.out
    has_val = bool(run.splits["val"])
    key = _score_key(cfg)
    best = max((row.get(key, -1.0) for row in run.history), default=-1.0)
    stale, epoch, run.step = 0, run.start_epoch, run.start_step
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            evaluated = has_val and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
            row = _train_and_evaluate_epoch(run, epoch, evaluated)
            # without a val split the latest model is the best one we know of
            improved = row.get(key, -1.0) > best if has_val else True
            if run.main:
                save_checkpoint(run.resumable(epoch + 1, 0), out / "last.pt")
                run.step = 0  # from here on, an interruption resumes at the next epoch
                if improved:
                    best = row.get(key, best)
                    best_checkpoint = run.checkpoint(epoch=epoch + 1, metrics=row)
                    save_checkpoint(best_checkpoint, out / "best.pt")
                    _write_card(run, best_checkpoint)
                runs.write_history(out, run.history)
                _track_epoch(run, row, evaluated)
                _print_epoch(row)
            run.step = 0
            if evaluated:
                stale = 0 if improved else stale + 1
            if _agree(bool(cfg.patience) and stale >= cfg.patience, run.world):
                if run.main:
                    print(f"early stop: no better {key} for {cfg.patience} evaluations")
                break
            _barrier(run.world)
    except KeyboardInterrupt:
        if run.main and run.step:  # otherwise last.pt already holds the last finished epoch
            save_checkpoint(run.resumable(epoch, run.step), out / "last.pt")
        if not (out / "last.pt").exists():
            raise TrainingStopped("interrupted before the first training step: nothing to save", 130) from None
        raise TrainingStopped(f"interrupted: saved {out / 'last.pt'}\n  resume with: python train.py --resume "
                              f"{out / 'last.pt'}", exit_code=130) from None
    except engine.NonFiniteLossError as e:
        last = out / "last.pt"
        raise TrainingStopped(f"{e}\n  stopping; the last good checkpoint is {last if last.exists() else 'none yet'}"
                              f" (lower --lr, or check those images with `python -m segkit check`)") from None
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(f"CUDA out of memory at --img-size {cfg.img_size} --batch-size {cfg.batch_size}: "
                              "try a smaller --img-size or --batch-size") from None


def _train_and_evaluate_epoch(run: _Run, epoch: int, evaluated: bool) -> dict:
    """Train one epoch (from ``run.step`` on, after an interruption), evaluate when asked; the metrics row."""
    cfg, loader = run.cfg, run.loaders["train"]
    _seed_epoch(cfg.seed, epoch, loader)
    skip, run.step = run.step, 0
    if skip and run.resume_rng is not None:
        _set_rng_state(run.resume_rng)  # mid-epoch resume: continue the interrupted random stream
    t0 = time.perf_counter()
    losses = engine.train_one_epoch(
        run.train_model, run.optimizer, loader, run.device, run.scheduler,
        run.scaler if run.scaler.is_enabled() else None, cfg.clip_grad or None, _batch_describer(loader.dataset),
        f"epoch {epoch + 1}/{cfg.epochs}", on_step=lambda n: setattr(run, "step", n),
        show_progress=cfg.progress and run.main, skip=skip, on_losses=_step_logger(run, epoch))
    row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in losses.items()},
           "lr": run.optimizer.param_groups[0]["lr"]}
    if run.main and evaluated:
        row.update(_evaluate(run, "val")[0])
    row["seconds"] = time.perf_counter() - t0
    row = {k: v if k == "epoch" else float(v) for k, v in row.items()}  # checkpoints hold plain numbers
    run.history.append(row)
    return row


def _evaluate(run: _Run, split: str) -> tuple[dict, dict]:
    """(metrics.csv row, full report) of ``split`` for the run's task."""
    cfg = run.cfg
    if cfg.task == "semantic":
        return semantic.evaluate(run.model, run.loaders[split], run.device, split, cfg.progress)
    row, report = engine.evaluate(run.model, run.loaders[split], run.device, cfg.score_threshold, split,
                                  cfg.progress, run.ground_truth[split])
    row.update({f"{split}_{t}_ap_{name}": v for t in ("bbox", "segm") for name, v in report[t]["per_class"].items()})
    return row, report


def _score_key(cfg: TrainConfig) -> str:
    """The validation number that picks best.pt and drives early stopping."""
    return semantic.SCORE_KEY if cfg.task == "semantic" else "val_segm_map"


def _print_epoch(row: dict) -> None:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.3f}"]
    if "val_pixel_accuracy" in row:  # a semantic run (instance rows have val_miou too)
        parts += [f"val loss {row['val_loss']:.3f}", f"mIoU {row['val_miou']:.3f}",
                  f"pixel acc {row['val_pixel_accuracy']:.3f}"]
    elif "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.3f}", f"box AP {row['val_bbox_map']:.3f}",
                  f"mask AP {row['val_segm_map']:.3f}", f"mask AP50 {row['val_segm_map50']:.3f}"]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.0f}s"]
    print(" | ".join(parts), flush=True)


def resolve_model(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the task's default model filled in; a model of the other task stops with what would work."""
    table = SEMANTIC_ARCHITECTURES if cfg.task == "semantic" else ARCHITECTURES
    if cfg.model is None:
        return dataclasses.replace(cfg, model=DEFAULT_SEMANTIC_MODEL if cfg.task == "semantic" else
                                   "maskrcnn_resnet50_fpn")
    if cfg.model not in table:
        raise TrainingStopped(f"--model {cfg.model} is not a {cfg.task} model; with --task {cfg.task} choose one "
                              f"of: {', '.join(table)}", exit_code=2)
    return cfg


def _frozen_bn(cfg: TrainConfig) -> bool:
    return cfg.task == "instance" and uses_frozen_bn(cfg.model, cfg.weights)


def _carried_heads(weights: str | None, classes: list[str]) -> str | None:
    """What a start from a segkit checkpoint of other classes keeps (matched by name), said so that a
    renamed label's fresh start is no surprise; None when there is nothing to say."""
    if not is_pretrained(weights) or str(weights).lower() == "coco":
        return None
    known = checkpoint_classes(weights)
    if known is None or known == classes:
        return None
    known_keys, keys = {class_key(c) for c in known}, {class_key(c) for c in classes}
    kept = [c for c in classes if class_key(c) in known_keys]
    new = [c for c in classes if class_key(c) not in known_keys]
    dropped = [c for c in known if class_key(c) not in keys]
    return (f"starting from {weights}: trained heads kept for {', '.join(kept) or 'no class'}; "
            f"new for {', '.join(new) or 'no class'}" + (f"; not in this data: {', '.join(dropped)}" if dropped else ""))


def _make_model(cfg: TrainConfig, classes: list[str], resumed: bool) -> torch.nn.Module:
    """The run's model; a resumed run rebuilds the same modules and frozen layers, its weights come from last.pt."""
    num_classes = len(classes) + 1
    if cfg.task == "semantic":  # every layer trains: --trainable-layers is Mask R-CNN's
        try:
            return build_semantic_model(cfg.model, num_classes, None if resumed else cfg.weights, cfg.img_size,
                                        cfg.loss, classes=classes)
        except WeightsError as e:
            raise TrainingStopped(str(e), exit_code=2) from None
    try:
        model = build_model(cfg.model, num_classes, None if resumed else cfg.weights, cfg.trainable_layers,
                            cfg.img_size, frozen_bn=uses_frozen_bn(cfg.model, cfg.weights), mask_head=cfg.mask_head,
                            mask_resolution=cfg.mask_resolution, classes=classes)
    except (WeightsError, ValueError) as e:  # ValueError: a mask resolution PointRend cannot render
        raise TrainingStopped(str(e), exit_code=2) from None
    if resumed and is_pretrained(cfg.weights):
        freeze_backbone(model, DEFAULT_TRAINABLE_LAYERS if cfg.trainable_layers is None else cfg.trainable_layers)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = cfg.roi_batch_size  # training-time sampling only
    return model


def _make_optimization(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int, device: torch.device):
    """Optimizer over the trainable parameters, per-step LR schedule, and the AMP scaler (CUDA only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    return optimizer, scheduler, scaler


class LrSchedule:
    """Learning-rate factor per step: linear warm-up, then cosine to zero or x0.1 steps."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.total = max(cfg.epochs * steps_per_epoch, 1)
        self.warmup = min(cfg.warmup_iters, steps_per_epoch)
        self.milestones = [round(self.total * 2 / 3), round(self.total * 8 / 9)]
        self.cosine = cfg.schedule == "cosine"

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup:
            alpha = step / self.warmup
            warm = 0.001 * (1 - alpha) + alpha  # torchvision's warm-up: from lr/1000 to lr
        if self.cosine:
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, self.total) / self.total))
        return warm * 0.1 ** sum(step >= m for m in self.milestones)


def _setup_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins torchrun's process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _agree(flag: bool, world: int) -> bool:
    """Rank 0's decision, on every rank (only rank 0 evaluates, so only it knows when to stop)."""
    if world > 1:
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
    return flag


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _pick_device(name: str | None, local_rank: int) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _resumed_config(cli: TrainConfig, ckpt: dict) -> TrainConfig:
    """The saved run's settings, except what may change on resume: epochs, patience, device, workers, progress,
    trackers, and where the data is now (``--data``/``--images`` of a dataset that moved: the split is saved
    relative to it)."""
    saved = {f.name: ckpt["config"].get(f.name, getattr(cli, f.name)) for f in dataclasses.fields(TrainConfig)}
    keep = ("epochs", "patience", "device", "workers", "progress", "resume", "data", "images", "tracker", "mlflow_uri")
    defaults = TrainConfig()
    changed = {k: getattr(cli, k) for k in keep if getattr(cli, k) != getattr(defaults, k)}
    return TrainConfig(**{**saved, "resume": cli.resume, **changed})


def _load_data(cfg: TrainConfig, verbose: bool, api_key: str | None = None):
    from segkit.data.readers import DataError, load_dataset
    from segkit.data.validate import ensure_trainable

    try:
        records = load_dataset(cfg.data, cfg.format, cfg.images, api_key=api_key)
        ensure_trainable(records)
    except DataError as e:
        raise TrainingStopped(f"cannot train on {cfg.data}: {e}", exit_code=2) from None
    if verbose and records.problems:
        kinds: dict[str, int] = {}
        for p in records.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        print(f"{cfg.data}: {len(records.problems)} data problem(s) handled: "
              + ", ".join(f"{k} x{n}" for k, n in kinds.items()) + f" (details: python -m segkit check {cfg.data})")
    return records


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_epoch(seed: int, epoch: int, loader: DataLoader) -> None:
    """Make an epoch depend only on (seed, epoch): order, augmentation and the model's sampling."""
    epoch_seed = seed * 1000 + epoch
    _seed_everything(epoch_seed)
    loader.generator.manual_seed(epoch_seed)  # worker seeds come from here, not from the model's stream
    loader.dataset.transform.augment.set_random_seed(epoch_seed)  # in-process loading; workers reseed
    loader.sampler.set_epoch(epoch)


def _make_loaders(cfg: TrainConfig, splits: dict, classes: list[str], world: int, rank: int) -> dict:
    from segkit.data.dataset import SegmentationDataset, collate_fn
    from segkit.data.transforms import build_transform

    kind = semantic.SemanticDataset if cfg.task == "semantic" else SegmentationDataset
    loaders = {}
    for split, images in splits.items():
        train = split == "train"
        dataset = kind(images, classes, build_transform(cfg.aug if train else "none", train=train))
        # a last batch of one image would stop batch norm over 1x1 features (DeepLabV3's image pooling)
        drop_last = train and cfg.task == "semantic" and len(dataset) > cfg.batch_size * world
        if train:
            sampler = DistributedSampler(dataset, world, rank, seed=cfg.seed) if world > 1 else \
                EpochSampler(len(dataset), cfg.seed)
        else:
            sampler = None  # val/test are evaluated whole, once, by rank 0
        # Instance val/test go one image per forward, as torchvision's references evaluate: padding a batch
        # to a common size moves detections, and evaluate, predict and the demo see each image alone.
        batch_size = cfg.batch_size if train or cfg.task == "semantic" else 1
        loaders[split] = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                    num_workers=cfg.workers, collate_fn=collate_fn, drop_last=drop_last,
                                    generator=torch.Generator(),
                                    persistent_workers=False, pin_memory=torch.cuda.is_available())
    return loaders


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch_describer(dataset):
    def describe(targets) -> str:
        return ", ".join(str(dataset.images[int(t["image_id"])].path) for t in targets)

    return describe


# What --tracker mlflow uploads at the end (TensorBoard's event files sit beside them already)
ARTIFACTS = ("config.json", "metrics.csv", "test_metrics.json", "loss_curves.png", "metrics.png",
             "val_predictions.png", model_card.CARD_NAME, "best.pt")


def _finish(run: _Run) -> dict:
    """Test the best checkpoint, draw previews, write the model card, print where everything is."""
    from segkit.inference.visualize import save_png

    cfg, out = run.cfg, run.out
    best_path = out / "best.pt"
    best = load_checkpoint(best_path)
    run.model.load_state_dict(best["model"])
    test = {}
    if run.splits["test"]:
        test, report = _evaluate(run, "test")
        write_json(out / "test_metrics.json", {"epoch": best["epoch"], **test,
                                               ("semantic" if cfg.task == "semantic" else "ap"): report}, indent=2)
    runs.write_history(out, run.history, test)
    sheet = _preview(run)
    if sheet is not None:
        save_png(sheet, out / "val_predictions.png")
    _write_card(run, best, test, final=True)
    run.tracker.log_metrics(test, step=run.history[-1]["epoch"] if run.history else 0)
    for name in ARTIFACTS:
        run.tracker.log_artifact(out / name)
    summary = {"out": str(out), "best": str(best_path), "last": str(out / "last.pt"), "best_epoch": best["epoch"],
               "best_metrics": best.get("metrics", {}), "test": test}
    key, what = (("miou", "mIoU") if cfg.task == "semantic" else ("segm_map", "mask AP"))
    print(f"\ndone: best epoch {best['epoch']}, val {what} {best['metrics'].get('val_' + key, float('nan')):.3f}"
          + (f", test {what} {test['test_' + key]:.3f}" if test else ""))
    for name in ("best.pt", "last.pt", "metrics.csv", "loss_curves.png", "metrics.png", "val_predictions.png",
                 model_card.CARD_NAME):
        print(f"  {out / name}")
    print(f"serve it: python demo.py --checkpoint {best_path}")
    return summary


def _open_trackers(cfg: TrainConfig, out: Path, resumed: bool) -> tracking.Trackers:
    """The run's --tracker, with its settings logged; a missing package stops before training."""
    try:
        trackers = tracking.open_trackers(cfg.tracker, out, cfg.mlflow_uri, resumed)
    except tracking.TrackerError as e:
        raise TrainingStopped(str(e), exit_code=2) from None
    trackers.log_params(dataclasses.asdict(cfg))
    return trackers


def _step_logger(run: _Run, epoch: int):
    """engine's ``on_losses``: each step's losses and learning rate to the trackers (None without any)."""
    if not run.tracker:
        return None
    steps = len(run.loaders["train"])

    def log(step: int, losses: dict[str, float]) -> None:
        metrics = {**{f"step/{k}": v for k, v in losses.items()}, "step/lr": run.optimizer.param_groups[0]["lr"]}
        run.tracker.log_metrics(metrics, step=epoch * steps + step)

    return log


def _track_epoch(run: _Run, row: dict, evaluated: bool) -> None:
    """The epoch's metrics.csv row to the trackers, and the val predictions when it was evaluated."""
    if not run.tracker:
        return
    run.tracker.log_metrics(row, step=row["epoch"])
    if evaluated and (sheet := _preview(run)) is not None:
        run.tracker.log_image("val_predictions", sheet, step=row["epoch"])


def _preview(run: _Run):
    """Predictions beside the ground truth of the first val images (train without val), as one image."""
    from segkit.inference.predictor import Predictor, SemanticPredictor
    from segkit.inference.visualize import preview_sheet

    kind = SemanticPredictor if run.cfg.task == "semantic" else Predictor
    predictor = kind(run.model, run.classes, run.cfg.score_threshold, device=run.device)
    return preview_sheet(predictor, run.splits["val"] or run.splits["train"])


def _write_card(run: _Run, best: dict, test: dict | None = None, final: bool = False) -> None:
    model_card.write_model_card(run.out, best, run.history, model_card.instance_counts(run.splits), test,
                                model_card.hardware(run.device, run.world), final)
