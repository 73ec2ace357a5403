"""Stage 2, models: the architecture tables (Mask R-CNN, PointRend, semantic), starting weights,
and checkpoints that rebuild them."""
