"""mfrae: one- and two-step MeanFlow image generators in the latent space of Representation Autoencoders."""

__version__ = "0.1.0"
