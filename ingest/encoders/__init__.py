"""Encoders behind one registry: ``load_encoder("classic")``, ``load_encoder("open_clip:…")``…"""

from caselens.ingest.encoders.base import Encoder, EncoderInfo
from caselens.ingest.encoders.registry import available, load_encoder, load_from_record, register

__all__ = ["Encoder", "EncoderInfo", "available", "load_encoder", "load_from_record", "register"]
