"""Models: the architecture tables (Mask R-CNN, PointRend, semantic), starting weights, the forward pass
that turns their outputs into predictions (``forward``), checkpoint files (``checkpoint``, dictionaries
in and out) and exported model files (``artifacts``)."""
