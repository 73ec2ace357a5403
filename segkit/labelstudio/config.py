"""A project's labeling config: which tags segkit's regions must name, and which labels they may carry.

Label Studio accepts predictions whose ``from_name``, ``to_name`` or label do not match the config
and then shows nothing, so every region segkit sends is built from what the config declares.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from segkit.data.records import class_key

log = logging.getLogger("segkit.labelstudio")

KINDS = {"polygonlabels": "polygon", "brushlabels": "brush"}  # config tag (lower case) -> region kind


class LabelConfigError(ValueError):
    """The labeling config has nothing segkit can fill in (or is not XML)."""


@dataclass
class RegionTarget:
    """One ``<PolygonLabels>`` or ``<BrushLabels>`` tag: where regions go and the labels it offers."""

    from_name: str
    to_name: str
    kind: str  # "polygon" or "brush"
    labels: list[str] = field(default_factory=list)

    @property
    def brush(self) -> bool:
        return self.kind == "brush"


def region_targets(label_config: str) -> list[RegionTarget]:
    """Every polygon/brush labels tag of the config that points at an ``<Image>`` tag, in config order."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as e:
        raise LabelConfigError(f"the labeling config is not valid XML ({e})") from e
    images = {el.get("name") for el in root.iter() if el.tag.lower() == "image"}
    targets = []
    for el in root.iter():
        kind = KINDS.get(el.tag.lower())
        if kind and el.get("toName") in images:
            labels = [lab.get("value") for lab in el if lab.tag.lower() == "label" and lab.get("value")]
            targets.append(RegionTarget(el.get("name"), el.get("toName"), kind, labels))
    return targets


def choose_target(label_config: str, prefer: str = "polygon") -> RegionTarget:
    """The tag segkit fills: the first of kind ``prefer`` ("polygon" or "brush"), else the first there is."""
    targets = region_targets(label_config)
    if not targets:
        raise LabelConfigError("the labeling config has no <PolygonLabels> or <BrushLabels> tag on an <Image>; "
                               "segkit predicts polygons or brush masks")
    return next((t for t in targets if t.kind == prefer), targets[0])


def match_labels(classes: list[str], target: RegionTarget) -> dict[str, str]:
    """Checkpoint class -> the config's label of the same name, ignoring case; unmatched classes are left out.

    A config without any ``<Label>`` children (labels added dynamically) takes the classes as they are.
    """
    if not target.labels:
        return {c: c for c in classes}
    by_key = {class_key(label): label for label in target.labels}
    matched = {c: by_key[class_key(c)] for c in classes if class_key(c) in by_key}
    missing = [c for c in classes if c not in matched]
    if missing:
        log.warning("classes %s are not labels of <%s name=%r> (%s); their predictions are left out",
                    missing, target.kind, target.from_name, ", ".join(target.labels))
    return matched
