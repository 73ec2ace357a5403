"""Train/val/test splits: the export's own when it has them, else a deterministic stratified split."""
from __future__ import annotations

import random
from collections import Counter

from segkit.records import ImageRecord

SPLITS = ("train", "val", "test")


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
    """Pick ``size`` images from ``pool``: first one per class (rarest class first), then in pool order."""
    counts = Counter(inst.label for im in pool for inst in im.instances)
    chosen: list[ImageRecord] = []
    for label, count in sorted(counts.items(), key=lambda kv: (kv[1], kv[0])):
        if len(chosen) >= size:
            break
        if count < 2 or any(inst.label == label for im in chosen for inst in im.instances):
            continue  # a class seen once stays in train: a model cannot be validated on a class it never saw
        candidates = [im for im in pool if all(im is not c for c in chosen) and any(i.label == label for i in im.instances)]
        if len(candidates) >= 2:
            chosen.append(candidates[0])
    chosen += [im for im in pool if all(im is not c for c in chosen)][: size - len(chosen)]
    return chosen
