"""Patch features: encoder registry over timm, batched extraction, h5 / pt feature files."""

from hdmil.features.encoders import (
    Encoder,
    EncoderError,
    create_encoder,
    list_encoders,
    load_state_dict,
    register_encoder,
    save_encoder,
)
from hdmil.features.extract import extract_features, extract_slide_features
from hdmil.features.io import (
    FeatureBag,
    find_feature_files,
    read_features,
    update_feature_file,
    write_features,
)

__all__ = [
    "Encoder",
    "EncoderError",
    "FeatureBag",
    "create_encoder",
    "extract_features",
    "extract_slide_features",
    "find_feature_files",
    "list_encoders",
    "load_state_dict",
    "read_features",
    "register_encoder",
    "save_encoder",
    "update_feature_file",
    "write_features",
]
