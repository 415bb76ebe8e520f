"""NNX networks and the helper that turns one into the pure `(apply_fn, params)` pair."""

from flowdistill.models.apply import to_apply_fn
from flowdistill.models.classifier import Classifier
from flowdistill.models.embedding import LabelEmbedding, TimeEmbedding, sinusoidal_embedding
from flowdistill.models.mlp import MLP
from flowdistill.models.unet import UNet

__all__ = [
    'MLP', 'UNet', 'Classifier', 'to_apply_fn', 'TimeEmbedding', 'LabelEmbedding',
    'sinusoidal_embedding',
]
