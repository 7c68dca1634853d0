"""A post-hoc logit adjustment whose strength the federation picks on its own training images (fedlt's).

Menon et al.'s post-hoc rule shifts a network's logits by −τ'·log π at inference (π the training prior): for
a network trained with cross-entropy τ' 1 is the balanced error's consistent choice. A network trained with
the logit-adjusted loss needs none in theory, but fedlt's converged runs memorise the long tail, and the
margin the loss asked for is not all kept at test time: a further τ' 0.25-0.5 lifted FLAT-LA at τ 1 by
0.45-0.77 points on the test set (``results/posthoc-adjustment/``), and without server momentum τ 1.5 wants
τ' −0.25. Reading τ' off the test set tunes on it, so fedlt picks it without test data:

    every client, for each candidate τ' of a grid: h[τ', c] = #{own training images of class c that
                                                                argmax(z − τ'·log π) gets right}
    the server, from the sums H = Σ h and the class totals N = Σ n:  τ' = argmax_τ' mean_c H[τ', c] / N[c]

Only integers travel (a grid × classes matrix and the class counts per client), so secure aggregation
carries them as one exact sum. The training images are partly memorised, so this balanced recall
under-states how far the tail is pushed back at test time: on twelve finished networks of seven methods it
picked the test set's τ' or one 0.25 step below it where the test set had a clear maximum, and never cost
more than 0.03 points (``results/posthoc-training-recall/``). A class the federation lacks (π 0) is left
unshifted.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from fedlt_app.config import parse_float_list
from fedlt_app.models import EncoderClassifier

HITS_KEY = "posthoc-hits"  # a client's (grid, classes) counts of right answers per candidate strength
TOTALS_KEY = "posthoc-totals"  # its class counts


def posthoc_shift(prior: Tensor | np.ndarray, strength: float) -> Tensor:
    """−strength·log π per class (float32), 0 where π is 0."""
    prior = torch.as_tensor(np.asarray(prior, dtype=np.float64))
    prior = prior / prior.sum()
    log_prior = torch.where(prior > 0, torch.log(prior.clamp(min=torch.finfo(torch.float64).tiny)),
                            torch.zeros_like(prior))
    return (-strength * log_prior).float()


def hits_per_strength(logits: Tensor, labels: Tensor, prior: Tensor | np.ndarray, strengths: tuple[float, ...],
                      num_classes: int) -> np.ndarray:
    """h[i, c]: how many samples of class c the logits shifted by ``strengths[i]`` classify right (int64)."""
    labels = labels.reshape(-1).long().cpu()
    logits = logits.detach().float().cpu()
    rows = []
    for strength in strengths:
        right = (logits + posthoc_shift(prior, strength)).argmax(dim=1) == labels
        rows.append(torch.bincount(labels[right], minlength=num_classes))
    return torch.stack(rows).numpy().astype(np.int64)


def balanced_recalls(hits: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Per strength, the mean over the classes present (total > 0) of their fraction right."""
    totals = np.asarray(totals, dtype=np.int64)
    present = totals > 0
    if not present.any():
        raise ValueError("no class has a sample: nothing to measure the adjustment on")
    return (np.asarray(hits, dtype=np.float64)[:, present] / totals[present]).mean(axis=1)


def pick_strength(strengths: tuple[float, ...], hits: np.ndarray, totals: np.ndarray) -> float:
    """The strength of highest balanced recall; a tie goes to the smaller |τ'| (the least change), then to
    the positive one."""
    recalls = balanced_recalls(hits, totals)
    best = max(range(len(strengths)), key=lambda i: (recalls[i], -abs(strengths[i]), strengths[i]))
    return float(strengths[best])


def shifted_network(network: EncoderClassifier, prior: Tensor | np.ndarray, strength: float) -> EncoderClassifier:
    """A copy of ``network`` whose logits are ``network``'s − strength·log π: the shift folded into the
    linear head's bias, so the copy is an ordinary network (evaluated, saved and loaded as any other)."""
    if not isinstance(network.classifier, nn.Linear) or network.classifier.bias is None:
        raise ValueError("a post-hoc adjustment needs a linear head with a bias")
    shifted = copy.deepcopy(network)
    with torch.no_grad():
        bias = shifted.classifier.bias
        bias += posthoc_shift(prior, strength).to(bias.device, bias.dtype)
    return shifted


def candidate_strengths(grid: str) -> tuple[float, ...]:
    """``fedavg-la-posthoc-grid``'s strengths, ascending, with 0 (the network unchanged) always among them."""
    return tuple(sorted(set(parse_float_list(grid)) | {0.0}))
