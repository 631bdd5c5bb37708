"""Soft Teacher: end-to-end semi-supervised object detection on Ray."""

__version__ = "0.1.0"
