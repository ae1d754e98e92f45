"""Evaluation: Fréchet distance (FID with the FID Inception-v3 under a named FID convention, FD on encoder
features), sFID, Inception Score, k-NN precision / recall, class accuracy, image-set I/O (ADM .npz, image folders,
read whole or streamed) and the `mfrae eval` command (`mfrae.eval.cli`; the FID-50K protocol: docs/evaluation.md).
"""

from mfrae.eval.conventions import DEFAULT_FID_CONVENTION, FID_CONVENTIONS, fid_input
from mfrae.eval.features import (
    Extracted,
    FeatureExtractor,
    FeatureOptions,
    available_feature_extractors,
    build_feature_extractor,
    default_device,
    encoder_feature_extractor,
    register_feature_extractor,
    unregister_feature_extractor,
)
from mfrae.eval.inception import FIDInceptionV3, InceptionOutputs, load_fid_inception
from mfrae.eval.metrics import (
    FeatureStats,
    PrecisionRecall,
    RunningStats,
    class_accuracy,
    frechet_distance,
    frechet_distance_sqrtm,
    inception_score,
    precision_recall,
    sfid,
    trace_sqrt_product,
)
from mfrae.eval.samples import (
    ImageSet,
    ImageStream,
    from_uint8_nhwc,
    load_images,
    open_images,
    save_adm_npz,
    save_image_dir,
    to_uint8_nhwc,
)

__all__ = [
    "DEFAULT_FID_CONVENTION",
    "FID_CONVENTIONS",
    "Extracted",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureOptions",
    "FeatureStats",
    "ImageSet",
    "ImageStream",
    "InceptionOutputs",
    "PrecisionRecall",
    "RunningStats",
    "available_feature_extractors",
    "build_feature_extractor",
    "class_accuracy",
    "default_device",
    "encoder_feature_extractor",
    "fid_input",
    "frechet_distance",
    "frechet_distance_sqrtm",
    "from_uint8_nhwc",
    "inception_score",
    "load_fid_inception",
    "load_images",
    "open_images",
    "precision_recall",
    "register_feature_extractor",
    "save_adm_npz",
    "save_image_dir",
    "sfid",
    "to_uint8_nhwc",
    "trace_sqrt_product",
    "unregister_feature_extractor",
]
from mfrae.eval import judge as _judge  # noqa: E402,F401  registers the "digits_judge" feature extractor
