"""Train/val/test splits: the export's own when it has them, else a deterministic stratified split."""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from segkit.data.records import ImageRecord, restrict_to_classes

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The requested split cannot be chosen; the message says what would work."""


def split_records(images: list[ImageRecord], val_frac: float, test_frac: float,
                  seed: int) -> dict[str, list[ImageRecord]]:
    """Use the export's splits if any image has one; otherwise split by ``val_frac`` and ``test_frac``.

    The random split is deterministic for a seed and puts every class in val (and then test) where
    that class has images enough to spare one for each held-out split and one for training.
    """
    if any(im.split for im in images):
        return {s: [im for im in images if (im.split or "train") == s] for s in SPLITS}
    order = sorted(images, key=lambda im: str(im.path))
    random.Random(seed).shuffle(order)
    n = len(order)
    sizes = {"val": round(n * val_frac), "test": round(n * test_frac)}
    if n >= 3:  # keep at least one image for each requested held-out split when there is data to spare
        sizes = {k: max(v, 1) if frac > 0 else 0 for (k, v), frac in zip(sizes.items(), (val_frac, test_frac))}
    remaining = list(order)
    out: dict[str, list[ImageRecord]] = {}
    for split in ("val", "test"):
        out[split] = _take_stratified(remaining, sizes[split])
        remaining = [im for im in remaining if all(im is not x for x in out[split])]
    out["train"] = remaining
    return {s: out[s] for s in SPLITS}


def _take_stratified(pool: list[ImageRecord], size: int) -> list[ImageRecord]:
    """Pick ``size`` images from ``pool``: first one per class (rarest class first), then in pool order.

    Never takes the last image of a class in ``pool``: that one stays for training, since a model
    cannot be validated on a class it never saw. So a held-out split may come out smaller than ``size``.
    """
    images_of = Counter(label for im in pool for label in _labels(im))
    chosen: list[ImageRecord] = []

    def takeable(im: ImageRecord) -> bool:
        return all(im is not c for c in chosen) and all(images_of[label] >= 2 for label in _labels(im))

    def take(im: ImageRecord) -> None:
        chosen.append(im)
        images_of.subtract(_labels(im))

    for label, _ in sorted(images_of.items(), key=lambda kv: (kv[1], kv[0])):
        if len(chosen) >= size:
            break
        if not any(label in _labels(im) for im in chosen):
            candidate = next((im for im in pool if label in _labels(im) and takeable(im)), None)
            if candidate is not None:
                take(candidate)
    for im in pool:
        if len(chosen) >= size:
            break
        if takeable(im):
            take(im)
    return chosen


def _labels(im: ImageRecord) -> set[str]:
    return {inst.label for inst in im.instances}


def split_paths(splits: dict[str, list[ImageRecord]], data: str | Path) -> dict[str, list[str]]:
    """The split as image paths, as checkpoints and split.json save it: relative to the dataset folder
    ``data`` where the image is inside it, so a dataset moved or copied elsewhere keeps its split."""
    root = _root(Path(data)).resolve()

    def name(im: ImageRecord) -> str:
        path = Path(im.path).resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(im.path)

    return {k: [name(im) for im in v] for k, v in splits.items()}


def restore_split(images: list[ImageRecord], saved: dict[str, list[str]],
                  data: str | Path) -> dict[str, list[ImageRecord]]:
    """The split a run saved (:func:`split_paths`), rebuilt from freshly read records, for resuming."""
    by_key = {key: im for im in images for key in _record_keys(im, Path(data))}
    out, missing = {}, []
    for split, paths in saved.items():
        out[split] = []
        for p in paths:
            im = next((by_key[k] for k in _path_keys([p], Path(data)) if k in by_key), None)
            if im is None:
                missing.append(p)
            else:
                out[split].append(im)
    if missing:
        raise SplitError(f"{len(missing)} image(s) of the saved split are not in {data}, e.g. {missing[0]}")
    return out


def select_split(images: list[ImageRecord], saved: dict[str, list] | None, split: str,
                 data: Path) -> tuple[list[ImageRecord], str]:
    """The images to evaluate and a phrase saying where the choice came from.

    ``saved`` is the checkpoint's ``split`` (image paths, absolute or relative to ``data``, or ids);
    when it is absent the records' own ``split`` field is used; when neither exists, all images.
    """
    if split == "all":
        return images, "all images"
    if saved:
        if split not in saved:
            raise SplitError(f"the checkpoint saved splits {', '.join(saved)}, not {split}; "
                             "use --split all or one of those")
        wanted = _path_keys(saved[split], data)
        chosen = [im for im in images if _record_keys(im, data) & wanted]
        if not chosen and saved[split]:
            raise SplitError(f"none of the {len(saved[split])} {split} images saved in the checkpoint are in "
                             f"{data}; pass the data it was trained on, or --split all")
        missing = len(saved[split]) - len(chosen)
        note = f" ({missing} of its images not found)" if missing else ""
        return chosen, f"the {split} split saved in the checkpoint{note}"
    if any(im.split for im in images):
        chosen = [im for im in images if (im.split or "train") == split]
        if not chosen:
            have = sorted({im.split or "train" for im in images})
            raise SplitError(f"the dataset has no {split} split (it has {', '.join(have)}); "
                             "use --split all or one of those")
        return chosen, f"the dataset's own {split} split"
    return images, "all images (neither the checkpoint nor the dataset has splits)"


def saved_split_images(ckpt: dict, split: str = "val", limit: int | None = None) -> list[Path]:
    """The image files of a checkpoint's saved ``split`` that are on this machine, in split order (at most
    ``limit``): the model's own examples. None for a live Label Studio project (its images are not files here)."""
    data = (ckpt.get("config") or {}).get("data")
    names = (ckpt.get("split") or {}).get(split) or []
    if not data or "://" in str(data):
        return []
    root = _root(Path(data))
    paths = [p if p.is_absolute() else root / p for p in map(Path, names)]
    return [p for p in paths if p.is_file()][:limit]


def _root(data: Path) -> Path:
    """The folder relative split paths start from: the dataset folder, or the folder of a dataset file."""
    return data if data.is_dir() else data.parent


def _path_keys(items: list, data: Path) -> set[str]:
    root = _root(data)
    keys = set()
    for item in items:
        keys.add(str(item))
        p = Path(str(item))
        keys.add(str(p.resolve()))  # absolute, or relative to where training ran
        if not p.is_absolute():
            keys.add(str((root / p).resolve()))  # relative to the dataset
    return keys


def _record_keys(im: ImageRecord, data: Path) -> set[str]:
    root = _root(data)
    path = Path(im.path).resolve()
    keys = {str(path), str(im.path)}
    if path.is_relative_to(root.resolve()):
        keys.add(path.relative_to(root.resolve()).as_posix())
    if im.image_id is not None:
        keys.add(str(im.image_id))
    return keys


def model_split(images: Sequence[ImageRecord], ckpt: dict, split: str,
                data: Path) -> tuple[list[ImageRecord], str, dict[str, int]]:
    """A trained model's ``split`` of ``images`` (see :func:`select_split`), keeping only the classes the
    model knows: (records, where the choice came from, ignored annotations per unknown class)."""
    records, which = select_split(images, ckpt.get("split"), split, Path(data))
    records, unknown = restrict_to_classes(records, ckpt["classes"])
    return records, which, unknown
