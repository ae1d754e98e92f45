"""Evaluation: Fréchet distance (FID with the FID Inception-v3, FD on encoder features), k-NN precision /
recall, class accuracy, image-set I/O (ADM .npz, image folders) and the `mfrae eval` command (`mfrae.eval.cli`).
"""

from mfrae.eval.features import (
    Extracted,
    FeatureExtractor,
    FeatureOptions,
    available_feature_extractors,
    build_feature_extractor,
    encoder_feature_extractor,
    register_feature_extractor,
    unregister_feature_extractor,
)
from mfrae.eval.inception import FIDInceptionV3, load_fid_inception
from mfrae.eval.metrics import FeatureStats, PrecisionRecall, class_accuracy, frechet_distance, precision_recall
from mfrae.eval.samples import ImageSet, from_uint8_nhwc, load_images, save_adm_npz, save_image_dir, to_uint8_nhwc

__all__ = [
    "Extracted",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureOptions",
    "FeatureStats",
    "ImageSet",
    "PrecisionRecall",
    "available_feature_extractors",
    "build_feature_extractor",
    "class_accuracy",
    "encoder_feature_extractor",
    "frechet_distance",
    "from_uint8_nhwc",
    "load_fid_inception",
    "load_images",
    "precision_recall",
    "register_feature_extractor",
    "save_adm_npz",
    "save_image_dir",
    "to_uint8_nhwc",
    "unregister_feature_extractor",
]
from mfrae.eval import judge as _judge  # noqa: E402,F401  registers the "digits_judge" feature extractor
