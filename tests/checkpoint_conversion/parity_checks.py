"""Shared by the parity tests: perturbing a torch model's weights and comparing logits."""

from __future__ import annotations

import numpy as np


def perturb_norms_and_biases(model, seed: int) -> None:
    """Norm scales off 1 and biases off 0 (in place), so a swapped or dropped tensor shows."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight")):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def token_kl(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """[N] KL(softmax(reference) || softmax(logits)) per token of [1, N, V] logits, float64."""
    reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    log_p = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    log_q = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)[0]
