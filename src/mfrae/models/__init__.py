"""Models: the DiT^DH teacher / MeanFlow student, the RAE ViT decoder, frozen encoders and the RAE."""

from mfrae.models.dit_dh import DiTDH, DiTDHConfig
from mfrae.models.encoders import RepresentationEncoder, build_encoder, register_encoder
from mfrae.models.rae import RAE, LatentStats
from mfrae.models.small_encoder import SmallViTEncoder  # registers "small_vit"
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig

__all__ = [
    "DiTDH",
    "DiTDHConfig",
    "LatentStats",
    "RAE",
    "RepresentationEncoder",
    "SmallViTEncoder",
    "ViTDecoder",
    "ViTDecoderConfig",
    "build_encoder",
    "register_encoder",
]
