"""segkit: train Mask R-CNN on your Label Studio or labelme annotations and serve it in a browser."""
__version__ = "0.1.0"
