"""Fine-tune Mask R-CNN (or, with ``--task semantic``, a semantic model) on an export: :func:`train`
(``python train.py`` runs it with a :class:`~segkit.engine.config.TrainConfig`).

Reads and validates the data, splits it, trains with warm-up and cosine (or step) decay, evaluates
COCO AP (semantic: mIoU) every epoch, writes metrics.csv, curves, MODEL_CARD.md and best/last checkpoints to
``runs/<name>/`` (and to TensorBoard or MLflow with ``--tracker``), and resumes exactly from ``last.pt``.
Under ``torchrun`` it trains with DistributedDataParallel. The story is :func:`train`: :func:`_setup`,
then :func:`_train_epochs`, then :func:`_finish`; what differs between tasks is asked of :mod:`segkit.tasks`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from segkit.atomic import write_json
from segkit.data.dataset import SegmentationDataset, collate_fn
from segkit.data.readers import DataError, load_dataset
from segkit.data.records import median_side
from segkit.data.splits import SPLITS, SplitError, restore_split, split_paths, split_records
from segkit.data.transforms import build_transform
from segkit.data.validate import ensure_trainable
from segkit.engine import loops, model_card, runs, tracking
from segkit.engine.config import TrainConfig, TrainingStopped, resolve_model, resumed_config
from segkit.engine.distributed import agree, barrier, pick_device, setup_distributed
from segkit.engine.optim import make_optimization, restore_optimization
from segkit.engine.refiner import RefinerConfig, add_refiner
from segkit.engine.seeding import EpochSampler, rng_state, seed_epoch, seed_everything, set_rng_state
from segkit.inference.predictor import Predictor
from segkit.inference.tiles import Tiling
from segkit.inference.visualize import preview_sheet, save_png
from segkit.models.checkpoint import load_checkpoint, save_checkpoint
from segkit.tasks.checkpoint import make_checkpoint
from segkit.models.mask_rcnn import WeightsError, carried_heads, count_parameters, format_start
from segkit.tasks import Task, get_task
from segkit.tasks.wording import wording

__all__ = ["EpochSampler", "TrainConfig", "TrainingStopped", "train"]


def train(cfg: TrainConfig, api_key: str | None = None) -> dict:
    """Run (or resume) training; return a summary with the run folder, best metrics and paths.

    ``api_key`` is for a Label Studio project URL as ``cfg.data`` (default ``$LABEL_STUDIO_API_KEY``);
    it is never saved.

    Raises :class:`TrainingStopped` when it cannot start or has to stop early; ``last.pt`` then holds
    what can be resumed.
    """
    rank, world, local_rank = setup_distributed()
    try:
        run = _setup(cfg, rank, world, local_rank, api_key)
        with run.tracker:  # closes the trackers' run as finished, failed or killed
            _train_epochs(run)
            summary = _finish(run) if run.main else {}
        barrier(world)
        return summary
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything one training run holds, built by :func:`_setup` and advanced by :func:`_train_epochs`."""

    cfg: TrainConfig
    task: Task
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
    start: dict[str, str] | None = None  # where each part of the model started from (instance models)
    start_epoch: int = 0
    start_step: int = 0  # batches of start_epoch already trained before an interruption
    resume_rng: dict | None = None
    step: int = 0  # batches of the current epoch trained so far
    tracker: tracking.Trackers = field(default_factory=tracking.Trackers)  # rank 0's --tracker; none elsewhere

    def checkpoint(self, **extra) -> dict:
        """The model's checkpoint with this run's description (``extra``: epoch, metrics, resume state)."""
        return make_checkpoint(self.model, self.cfg.model, self.classes, self.cfg.img_size, self.cfg.score_threshold,
                               self.task.frozen_bn(self.cfg), task=self.cfg.task, config=dataclasses.asdict(self.cfg),
                               split=split_paths(self.splits, self.cfg.data), data_source=self.data_source,
                               train_side=_train_side(self.cfg, self.splits["train"]),
                               **({"start": self.start} if self.start else {}), **extra)

    def resumable(self, epoch_done: int, step: int) -> dict:
        """last.pt: the checkpoint plus everything needed to continue exactly where training is."""
        return self.checkpoint(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                               scaler=self.scaler.state_dict(), epoch=epoch_done, step=step,
                               history=self.history[:epoch_done], rng=rng_state(),
                               metrics=self.history[-1] if self.history else {})


def _setup(cfg: TrainConfig, rank: int, world: int, local_rank: int, api_key: str | None = None) -> _Run:
    """Read and split the data, build model, loaders and optimizer, restore a resumed run; print a summary."""
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        cfg = resumed_config(cfg, resume["config"])
    cfg = resolve_model(cfg)
    task, device, main = get_task(cfg.task), pick_device(cfg.device, local_rank), rank == 0
    # A live Label Studio project is fetched once per machine: each machine's first process fills the image
    # cache (on that machine's disk), the others then read it
    if local_rank != 0:
        barrier(world)
    records = _load_data(cfg, verbose=main, api_key=api_key)
    if local_rank == 0:
        barrier(world)
    classes = resume["classes"] if resume else records.classes
    splits = _split(cfg, records.images, resume)
    out = Path(cfg.out) if cfg.out else runs.next_run_dir(Path("runs"), cfg.name, main, world)
    cfg = dataclasses.replace(cfg, out=str(out))

    seed_everything(cfg.seed)
    loaders = _make_loaders(cfg, task, splits, classes, world, rank)
    model = _make_model(cfg, task, classes, resumed=resume is not None).to(device)
    optimizer, scheduler, scaler = make_optimization(cfg, model, len(loaders["train"]), device)
    if resume:
        model.load_state_dict(resume["model"])
        restore_optimization(resume, optimizer, scheduler, scaler)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ground_truth = {s: task.ground_truth(splits[s], classes) for s in ("val", "test") if main and splits[s]}
    run = _Run(cfg, task, out, main, world, device, classes, splits, loaders, model, train_model, optimizer,
               scheduler, scaler, ground_truth, history=[], data_source=records.origin,
               start=resume.get("start") if resume else task.starting_weights(cfg))
    if resume:
        run.history, run.start_epoch, run.start_step = resume["history"], resume["epoch"], resume.get("step", 0)
        run.resume_rng = resume.get("rng")
    if main:
        _start_run_folder(run, records.origin, resumed=resume is not None)
    return run


def _train_epochs(run: _Run) -> None:
    """The epoch loop; an interruption or a failure leaves a resumable last.pt and raises TrainingStopped."""
    cfg, out = run.cfg, run.out
    has_val = bool(run.splits["val"])
    key = run.task.score_key
    best = max((row.get(key, -1.0) for row in run.history), default=-1.0)
    stale, epoch, run.step = 0, run.start_epoch, run.start_step
    last = _LastCheckpoint(run)
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            evaluated = has_val and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
            row = _train_and_evaluate_epoch(run, epoch, evaluated)
            # without a val split the latest model is the best one we know of
            improved = row.get(key, -1.0) > best if has_val else True
            if run.main:
                # a best.pt chosen on val never runs ahead of last.pt: a resumed run knows every score to beat
                last.save(epoch, due=(improved and has_val) or epoch + 1 == cfg.epochs)
                if improved:
                    best = row.get(key, best)
                    best_checkpoint = run.checkpoint(epoch=epoch + 1, metrics=row)
                    save_checkpoint(best_checkpoint, out / "best.pt")
                    _write_card(run, best_checkpoint)
                # the plots are redrawn with each evaluation, not each epoch: a redraw costs ~1.4 s, a sixth
                # of a 4-image epoch on a CPU; without a val split the losses are all there is to draw
                runs.write_history(out, run.history, run.task, draw=evaluated or not has_val)
                _track_epoch(run, row, evaluated)
                _print_epoch(run, row)
            run.step = 0
            if evaluated:
                stale = 0 if improved else stale + 1
            if agree(bool(cfg.patience) and stale >= cfg.patience, run.world):
                if run.main:
                    last.save(epoch, due=True)
                    print(f"early stop: no better {key} for {cfg.patience} evaluations")
                break
            barrier(run.world)
    except KeyboardInterrupt:
        if run.main:
            last.save(epoch, due=True)
        if not (out / "last.pt").exists():
            raise TrainingStopped("interrupted before the first training step: nothing to save", 130) from None
        raise TrainingStopped(f"interrupted: saved {out / 'last.pt'}\n  resume with: python train.py --resume "
                              f"{out / 'last.pt'}", exit_code=130) from None
    except loops.NonFiniteLossError as e:
        last = out / "last.pt"
        raise TrainingStopped(f"{e}\n  stopping; the last good checkpoint is {last if last.exists() else 'none yet'}"
                              f" (lower --lr, or check those images with `python -m segkit check`)") from None
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(f"CUDA out of memory at --img-size {cfg.img_size} --batch-size {cfg.batch_size}: "
                              "try a smaller --img-size or --batch-size") from None


class _LastCheckpoint:
    """last.pt, written when due and otherwise at most every ``--save-interval`` seconds: a resumable checkpoint
    of Mask R-CNN is ~350 MB, and writing one after each epoch of a small dataset took a fifth of its training
    (4 images on a CPU: 95 of 421 s). A crash or SIGKILL loses at most that interval; Ctrl-C (and SIGTERM under
    the CLI) loses nothing."""

    def __init__(self, run: _Run):
        # a resumed run's last.pt holds where it starts; a new run's holds nothing past (0, 0)
        self.run, self.saved, self.saved_at = run, (run.start_epoch, run.start_step), time.monotonic()

    def position(self, epoch: int) -> tuple[int, int]:
        """How far training is in the loop's ``epoch``: (epochs finished, batches of the next one trained).
        An epoch counts as finished once its row is in the history, so this is exact at every instant."""
        run = self.run
        return (epoch + 1, 0) if len(run.history) > epoch else (epoch, run.step)

    def save(self, epoch: int, due: bool = False) -> None:
        """Write last.pt if training is past what it holds, and ``due`` or the interval has passed."""
        position = self.position(epoch)
        interval = self.run.cfg.save_interval
        if position <= self.saved or not (due or time.monotonic() - self.saved_at >= interval):
            return
        save_checkpoint(self.run.resumable(*position), self.run.out / "last.pt")
        self.saved, self.saved_at = position, time.monotonic()


def _train_and_evaluate_epoch(run: _Run, epoch: int, evaluated: bool) -> dict:
    """Train one epoch (from ``run.step`` on, after an interruption), evaluate when asked; the metrics row."""
    cfg, loader = run.cfg, run.loaders["train"]
    seed_epoch(cfg.seed, epoch, loader)
    skip, run.step = run.step, 0
    if skip and run.resume_rng is not None:
        set_rng_state(run.resume_rng)  # mid-epoch resume: continue the interrupted random stream
    t0 = time.perf_counter()
    losses = loops.train_one_epoch(
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


def _finish(run: _Run) -> dict:
    """Test the best checkpoint, draw previews, write the model card, print where everything is."""
    out, task = run.out, run.task
    best_path = out / "best.pt"
    best = load_checkpoint(best_path)
    run.model.load_state_dict(best["model"])
    test = {}
    if run.splits["test"]:
        test, report = _evaluate(run, "test")
        write_json(out / "test_metrics.json", {"epoch": best["epoch"], **test, task.report_key: report}, indent=2)
    runs.write_history(out, run.history, task, test)
    if run.cfg.interactive_head and task.name == "instance":
        _add_refiner(run, best, best_path)
    sheet = _preview(run)
    if sheet is not None:
        save_png(sheet, out / "val_predictions.png")
    _write_card(run, best, test, final=True)
    run.tracker.log_metrics(test, step=run.history[-1]["epoch"] if run.history else 0)
    for name in ARTIFACTS:
        run.tracker.log_artifact(out / name)
    summary = {"out": str(out), "best": str(best_path), "last": str(out / "last.pt"), "best_epoch": best["epoch"],
               "best_metrics": best.get("metrics", {}), "test": test}
    key, what = wording(task.name).headline
    print(f"\ndone: best epoch {best['epoch']}, val {what} {best['metrics'].get('val_' + key, float('nan')):.3f}"
          + (f", test {what} {test['test_' + key]:.3f}" if test else ""))
    for name in ("best.pt", "last.pt", "metrics.csv", "loss_curves.png", "metrics.png", "val_predictions.png",
                 model_card.CARD_NAME):
        print(f"  {out / name}")
    print(f"serve it: python demo.py --checkpoint {best_path}")
    return summary


def _add_refiner(run: _Run, best: dict, best_path: Path) -> None:
    """best.pt with the click-refinement head trained on the run's train split (the detector stays as it is)."""
    cfg = RefinerConfig(steps=run.cfg.interactive_head_steps, seed=run.cfg.seed)
    dataset = SegmentationDataset(run.splits["train"], run.classes, tile=run.cfg.train_tiles)
    bar = tqdm(total=cfg.steps, desc="refinement head", disable=not run.cfg.progress, leave=False)
    try:
        refined = add_refiner(best, dataset, cfg, run.device, lambda step, loss: bar.update(1))
    except (ValueError, RuntimeError) as e:  # the detector is trained and saved: say so, and how to try again
        print(f"warning: no refinement head ({e}); best.pt is complete without it. Train one later with: "
              f"segkit refiner {best_path}")
        return
    finally:
        bar.close()
    save_checkpoint({k: v for k, v in refined.items() if k != "segkit_version"}, best_path)
    stats = refined["refiner"]
    print(f"refinement head: {stats['steps']} steps on {stats['objects']} objects in {stats['seconds']} s, "
          f"loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}")


# What --tracker mlflow uploads at the end (TensorBoard's event files sit beside them already)
ARTIFACTS = ("config.json", "metrics.csv", "test_metrics.json", "loss_curves.png", "metrics.png",
             "val_predictions.png", model_card.CARD_NAME, "best.pt")


def _load_data(cfg: TrainConfig, verbose: bool, api_key: str | None = None):
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


def _split(cfg: TrainConfig, images: list, resume: dict | None) -> dict[str, list]:
    """The run's train/val/test records: a resumed run's saved split, else a fresh one."""
    try:
        splits = restore_split(images, resume["split"], cfg.data) if resume else split_records(
            images, cfg.val_frac, cfg.test_frac, cfg.seed)
    except SplitError as e:
        raise TrainingStopped(f"cannot resume: {e}") from None
    if cfg.limit:
        splits = {k: v[: cfg.limit] for k, v in splits.items()}
    if not splits["train"]:
        raise TrainingStopped(f"{cfg.data}: no training images after splitting {len(images)} images")
    return splits


def _make_model(cfg: TrainConfig, task: Task, classes: list[str], resumed: bool) -> torch.nn.Module:
    """The run's model; a resumed run rebuilds the same modules and frozen layers, its weights come from last.pt."""
    try:
        return task.build_model(cfg, classes, resumed)
    except (WeightsError, ValueError) as e:  # ValueError: e.g. a mask resolution PointRend cannot render
        raise TrainingStopped(str(e), exit_code=2) from None


def _make_loaders(cfg: TrainConfig, task: Task, splits: dict, classes: list[str], world: int, rank: int) -> dict:
    loaders = {}
    for split, images in splits.items():
        train = split == "train"
        # tiled training: val/test losses on fixed tiles; their metrics predict the whole images in tiles
        dataset = task.dataset(images, classes, build_transform(cfg.aug if train else "none", train=train),
                               tile=cfg.train_tiles)
        if train:
            sampler = DistributedSampler(dataset, world, rank, seed=cfg.seed) if world > 1 else \
                EpochSampler(len(dataset), cfg.seed)
        else:
            sampler = None  # val/test are evaluated whole, once, by rank 0
        loaders[split] = DataLoader(dataset, sampler=sampler, shuffle=False, num_workers=cfg.workers,
                                    collate_fn=collate_fn, generator=torch.Generator(), persistent_workers=False,
                                    pin_memory=torch.cuda.is_available(),
                                    **task.loader_options(cfg, train, len(dataset), world))
    return loaders


def _start_run_folder(run: _Run, origin: dict | None, resumed: bool) -> None:
    """config.json, split.json and where the data came from; open the trackers; say what is about to run."""
    cfg, out = run.cfg, run.out
    write_json(out / "config.json", {**dataclasses.asdict(cfg), **({"start": run.start} if run.start else {})},
               indent=2)
    write_json(out / "split.json", split_paths(run.splits, cfg.data), indent=2)
    if origin:
        write_json(out / "data_source.json", origin, indent=2)
    if not resumed and (carried := carried_heads(cfg.weights, run.classes)):
        print(carried)
    if run.start:
        print(format_start(run.start))
    run.tracker = _open_trackers(cfg, out, resumed)
    trainable, total = count_parameters(run.model)
    print(f"segkit: {cfg.model} ({trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters trainable), "
          f"{len(run.classes)} classes {run.classes}, images train/val/test = "
          f"{'/'.join(str(len(run.splits[s])) for s in SPLITS)}, device {run.device}, "
          f"{run.world} process(es) -> {out}")


def _evaluate(run: _Run, split: str) -> tuple[dict, dict]:
    """(metrics.csv row, full report) of ``split`` for the run's task."""
    evaluator = run.task.evaluator(run.splits[split], run.classes, run.cfg.score_threshold,
                                   run.ground_truth.get(split))
    return loops.evaluate(run.model, run.loaders[split], run.device, run.task, evaluator, split, run.cfg.progress,
                          _tiling(run.cfg))


def _tiling(cfg: TrainConfig) -> Tiling | None:
    """How a tiled run's validation and previews predict: as ``--tile auto`` will for its checkpoint."""
    return Tiling(cfg.train_tiles) if cfg.train_tiles else None


def _train_side(cfg: TrainConfig, images: list) -> int | None:
    """The shorter side of the images the model trained on (median): where ``--tile auto`` cuts."""
    side = median_side(images)
    return min(side, cfg.train_tiles) if side and cfg.train_tiles else side


def _print_epoch(run: _Run, row: dict) -> None:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.3f}"]
    if "val_loss" in row:
        parts += wording(run.task.name).epoch_summary(row)
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.0f}s"]
    print(" | ".join(parts), flush=True)


def _batch_describer(dataset):
    def describe(targets) -> str:
        return ", ".join(str(dataset.images[int(t["image_id"])].path) for t in targets)

    return describe


def _open_trackers(cfg: TrainConfig, out: Path, resumed: bool) -> tracking.Trackers:
    """The run's --tracker, with its settings logged; a missing package stops before training."""
    try:
        trackers = tracking.open_trackers(cfg.tracker, out, cfg.mlflow_uri, resumed)
    except tracking.TrackerError as e:
        raise TrainingStopped(str(e), exit_code=2) from None
    trackers.log_params(dataclasses.asdict(cfg))
    return trackers


def _step_logger(run: _Run, epoch: int):
    """loops' ``on_losses``: each step's losses and learning rate to the trackers (None without any)."""
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
    predictor = Predictor(run.model, run.classes, run.cfg.score_threshold, device=run.device, task=run.task.name)
    predictor.tile(_tiling(run.cfg))
    return preview_sheet(predictor, run.splits["val"] or run.splits["train"])


def _write_card(run: _Run, best: dict, test: dict | None = None, final: bool = False) -> None:
    model_card.write_model_card(run.out, best, run.history, model_card.instance_counts(run.splits), test,
                                model_card.hardware(run.device, run.world), final)
