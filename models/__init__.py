"""Encoders and self-supervised methods; `load_encoder` is all a downstream consumer needs."""

from streamssl.models.backbones import build_backbone
from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.encoder_io import load_encoder
from streamssl.models.method import Method
from streamssl.models.published import PublishedEncoder
from streamssl.models.registry import build_method

__all__ = ["EncoderLoadError", "Method", "PublishedEncoder", "build_backbone", "build_method", "load_encoder"]
