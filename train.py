"""Fine-tune Mask R-CNN on your annotations. ``python train.py --help`` lists every setting.

Same as ``python -m segkit train``; multi-GPU: ``torchrun --nproc_per_node=N train.py ...``.
"""
import sys

from segkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
