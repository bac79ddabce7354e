"""LarvSeg: large-vocabulary semantic segmentation from pixel masks and image-level tags."""

__version__ = "0.1.0"
