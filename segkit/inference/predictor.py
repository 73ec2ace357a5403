"""The one :class:`Predictor`: a trained model, loaded once, turning images into :class:`Prediction` s.

``segkit predict``, ``segkit evaluate``, the demo, training's preview images and the tests all run
their images through it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from segkit.data.images import ImageInput, as_rgb
from segkit.inference.tiles import Tiling, predict_tiled
from segkit.inference.tta import TTA, predict_tta
from segkit.models.artifacts import ExportError, Runner, load_runner
from segkit.models.forward import image_tensors, to_prediction
from segkit.structures.prediction import Prediction, SemanticPrediction
from segkit.models.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, task_of
from segkit.tasks.checkpoint import model_from_checkpoint
from segkit.models.mask_rcnn import coco_pretrained
from segkit.models.refiner import ClickRefiner, refiner_from_state
from segkit.tasks import get_task

# Convolutions in channels-last (NHWC) memory format, on the CPU, for models the Predictor builds
# itself: the same detections, and faster with oneDNN (bench/infer.py, README "Inference backends").
CPU_CHANNELS_LAST = True


class UnsupportedOption(ValueError):
    """Tiles or test-time augmentation asked of a model that cannot use them (said to the user as it is)."""


def refuse_unsupported(task: str, exported: bool, tiling: Tiling | None, tta: TTA | None) -> None:
    """Raise :class:`UnsupportedOption` when a model of ``task`` (``exported``: a fixed-size graph) cannot
    predict with ``tiling`` or ``tta``: before any work is shared out, and by the Predictor itself."""
    for option, what in ((tiling, "sliced inference"), (tta, "test-time augmentation")):
        if option is not None and task != "instance":
            raise UnsupportedOption(f"{what} is for instance models; this one is {task}")
    if tta is not None and tta.scales and exported:
        raise UnsupportedOption("test-time scales need the checkpoint's eager model: an exported model's input size "
                                "is fixed (mirroring alone works with it)")


class Predictor:
    """A trained model, loaded once, ready to segment images: the task's model (eager) or an exported one.

    ``predictor(image)`` returns a :class:`Prediction` (``task`` ``"instance"``: Mask R-CNN, whose
    torchvision model is ``predictor.model``) or a :class:`SemanticPrediction` (``"semantic"``: one class
    per pixel at the image's own size; the score threshold is accepted and ignored). What differs
    between tasks is asked of :mod:`segkit.tasks`.
    """

    def __init__(self, model: torch.nn.Module | None, classes: list[str], score_threshold: float = 0.5,
                 device: str | torch.device | None = None, info: dict | None = None,
                 max_detections: int | None = None, runner: Runner | None = None, task: str = "instance"):
        """``model`` is an eager model of ``task``; or None with ``runner``, an exported Mask R-CNN's
        detector (see :func:`segkit.models.artifacts.load_runner`), which runs on the CPU."""
        if runner is not None:
            device = "cpu"
        self.task = task
        self._task = get_task(task)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device) if model is not None else None
        self.runner = runner
        self.max_detections = max_detections
        if max_detections is not None and model is not None:
            # The mask head runs once per detection: on a CPU, torchvision's 100 cost seconds an image.
            self._task.cap_detections(self.model, max_detections)
        self.classes = list(classes)
        self.score_threshold = score_threshold
        self.info = info or {}  # what the checkpoint says about its training: metrics, image size, ...
        self.tiling: Tiling | None = None  # set with tile(): sliced inference of large images
        self.tta: TTA | None = None  # set with augment(): test-time augmentation
        self.refiner: ClickRefiner | None = None  # the checkpoint's click-refinement head, for prompts

    def tile(self, tiling: Tiling | None) -> "Predictor":
        """Predict images larger than ``tiling.size`` tile by tile (:mod:`segkit.inference.tiles`; a size of
        ``"auto"`` is worked out for this model, :meth:`Tiling.resolved`); None: whole. Images are then read
        at full resolution: the point is to see small objects at native size."""
        refuse_unsupported(self.task, self.runner is not None, tiling, None)
        self.tiling = tiling.resolved(self.info) if tiling is not None else None
        return self

    def augment(self, tta: TTA | None) -> "Predictor":
        """Predict each image (or tile) in ``tta``'s views and vote (:mod:`segkit.inference.tta`); None: once."""
        refuse_unsupported(self.task, self.runner is not None, None, tta)
        self.tta = tta
        return self

    @property
    def score_floor(self) -> float:
        """The model's own score cut-off (torchvision's ``box_score_thresh``; frozen in an exported model)."""
        if self.model is not None:
            return self._task.score_floor(self.model)
        return float(self.info["export"]["frozen"]["box_score_thresh"])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        max_detections: int | None = None, channels_last: bool | None = None) -> "Predictor":
        """Build the model from a segkit checkpoint alone, or load an exported model (see below);
        ``hf://owner/repo/file.pt`` comes from the Hugging Face Hub."""
        path = resolve_checkpoint(path)
        return cls.from_loaded_checkpoint(load_checkpoint(path), path, device, max_detections, channels_last)

    @classmethod
    def from_loaded_checkpoint(cls, ckpt: dict, path: str | os.PathLike, device: str | torch.device | None = None,
                               max_detections: int | None = None,
                               channels_last: bool | None = None) -> "Predictor":
        """The same, from a checkpoint already read with :func:`segkit.models.checkpoint.load_checkpoint`.

        An exported model (``.onnx``, ``.xml``, ``.torchscript``: what :func:`segkit.models.checkpoint.load_checkpoint`
        returns for it has an ``export`` entry) runs with its own backend. An eager model on the CPU
        runs in channels-last memory format where its task allows, unless ``channels_last`` is False
        (see :data:`CPU_CHANNELS_LAST`).
        """
        task = get_task(task_of(ckpt))
        info = {"checkpoint": str(Path(path)), "arch": ckpt["arch"], "img_size": ckpt["img_size"],
                "train_side": ckpt.get("train_side"), "train_tiles": (ckpt.get("config") or {}).get("train_tiles"),
                "epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics", {}), "task": task.name,
                **task.describe(ckpt)}
        threshold = ckpt.get("score_threshold", 0.5)
        if "export" in ckpt:
            try:
                runner = load_runner(path, ckpt)
            except ExportError as e:
                raise CheckpointError(str(e)) from e
            return cls(None, ckpt["classes"], threshold, "cpu", {**info, "export": ckpt["export"]}, max_detections,
                       runner=runner, task=task.name)
        predictor = cls(model_from_checkpoint(ckpt), ckpt["classes"], threshold, device, info, max_detections,
                        task=task.name)
        if ckpt.get("refiner") is not None:
            try:
                predictor.refiner = refiner_from_state(ckpt["refiner"], predictor.model).to(predictor.device)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
            predictor.info["refiner"] = {k: v for k, v in ckpt["refiner"].items() if k not in ("state_dict", "config")}
        if channels_last is None:
            channels_last = CPU_CHANNELS_LAST and task.channels_last and predictor.device.type == "cpu"
        if channels_last:
            predictor.model.to(memory_format=torch.channels_last)
            predictor.info["channels_last"] = True
        return predictor

    @classmethod
    def from_torchvision_coco(cls, device: str | torch.device | None = None,
                              max_detections: int | None = None) -> "Predictor":
        """torchvision's COCO-pretrained Mask R-CNN (91 COCO slots), when its weights are available."""
        model, classes = coco_pretrained()
        return cls(model, classes, 0.5, device, {"checkpoint": "torchvision COCO", "arch": "maskrcnn_resnet50_fpn"},
                   max_detections)

    @torch.inference_mode()
    def __call__(self, image: ImageInput, score_threshold: float | None = None) -> Prediction | SemanticPrediction:
        return self.predict_batch([image], score_threshold)[0]

    @torch.inference_mode()
    def predict_batch(self, images: list[ImageInput],
                      score_threshold: float | None = None) -> list[Prediction] | list[SemanticPrediction]:
        """Predict several images: in one forward pass (eager), or one by one (exported models)."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        if self.tiling is not None:
            return [predict_tiled(lambda tile: self._predict([tile], threshold)[0], as_rgb(image), self.tiling,
                                  self.max_detections) for image in images]
        return self._predict(images, threshold)

    def _predict(self, images: list[ImageInput], threshold: float) -> list[Prediction] | list[SemanticPrediction]:
        tensors = image_tensors(images, self.device)
        if self.tta is not None:  # the views keep all they find; the threshold applies to the voted scores
            return [predict_tta(lambda image, scale: self._forward([image], 0.0, scale)[0], t, self.tta,
                                self.max_detections).at_least(threshold) for t in tensors]
        return self._forward(tensors, threshold)

    def _forward(self, tensors: list[torch.Tensor], threshold: float,
                 scale: float = 1.0) -> list[Prediction] | list[SemanticPrediction]:
        if self.runner is not None:  # the score floor is frozen in the graph: filter afterwards
            outputs = [self._run_exported(t) for t in tensors]
            return [to_prediction(out, self.classes, threshold, t.shape[-2:]) for out, t in zip(outputs, tensors)]
        size = None if scale == 1 else round(scale * self.model.transform.min_size[-1])
        return self._task.predict(self.model, tensors, self.classes, threshold, size)

    def _run_exported(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, labels, scores, mask_probs = self.runner(image)
        n = len(scores) if self.max_detections is None else self.max_detections  # sorted by score
        return {"boxes": boxes[:n], "labels": labels[:n].to(torch.int64), "scores": scores[:n],
                "mask_probs": mask_probs[:n]}
