"""The embedded demo model: class-conditional Fashion-MNIST diffusion, trained by tiec, shipped offline."""

from .model import CLASSES, FashionPipeline, classify, load_pipeline, parse_prompt

__all__ = ["CLASSES", "FashionPipeline", "classify", "load_pipeline", "parse_prompt"]
