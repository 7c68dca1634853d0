"""The encoder's features of a client's own images, as the methods' statistics queries read them.

Shared below every method family that answers a query about the global model's representation (CCVR's
moments, RUCR's and FedNH's class means, FedYoYo's feature dispersion).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlt_app.data.transforms import to_float
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision


@torch.no_grad()
def encoder_features(model: EncoderClassifier, images: Tensor, dataset: str, precision: Precision,
                     batch_size: int = 256) -> Tensor:
    """The encoder's features of un-augmented images, eval mode, float32."""
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for i in range(0, len(images), batch_size):
        with precision.autocast():
            chunks.append(model.encoder(to_float(images[i : i + batch_size].to(device), dataset)).float())
    return torch.cat(chunks)
