"""Building blocks: networks and distributions."""

from vaekit.nn.distributions import BernoulliLikelihood, DiagonalGaussian, GaussianLikelihood
from vaekit.nn.layers import ACTIVATIONS, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, activation, mlp

__all__ = [
    "ACTIVATIONS", "BernoulliLikelihood", "ConvDecoder", "ConvEncoder", "DiagonalGaussian",
    "GaussianLikelihood", "MLPDecoder", "MLPEncoder", "activation", "mlp",
]
