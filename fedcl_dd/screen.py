"""Screening synthetic sets for poisoning before a server trains on their union.

An upload can pass every format check and still harm the global model: labels permuted,
images of another dataset, images scaled to dominate the training loss. The screen asks
of every set whether its peers agree with its labels: each of its images is classified
by the nearest class mean of the *other* sets, and the set is refused when too few of
its images land in the class they are labelled with.

* The class means of the other sets are combined per class by their coordinate-wise
  median, so the reference stays honest while fewer than half of the sets holding a
  class are poisoned (the robustness-to-a-minority argument of Blanchard et al.,
  NeurIPS 2017, applied to class means instead of model updates).
* Images are compared in two spaces, and a set must agree in both: raw (normalized)
  pixels, which see a set scaled out of range, and the embedding of a network --
  the server passes the global model it sent this round: a seeded random network in the
  first round (the space distribution matching works in), a trained one later.
* A set whose pixels' root mean square is more than ``magnitude`` times (or less than
  1/``magnitude`` of) the median of the other sets' is refused too: scaling every image
  keeps their nearest class means but lets the set dominate the loss of a network
  without input normalization.
* A class held by fewer than ``min_peers`` other sets has no reference; its images are
  not scored, and a set none of whose images can be scored is not refused.

The screen is for non-adaptive poisoning: an attacker who optimizes its set against the
screen's network and its peers' sets is out of its scope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import embed
from .synthetic import SyntheticSet

__all__ = ["DEFAULT_MAGNITUDE", "DEFAULT_SCREEN_THRESHOLD", "ScreenResult", "screen_sets"]

#: The least share of a set's scored images its peers must classify as labelled.
DEFAULT_SCREEN_THRESHOLD = 0.5
#: How far a set's pixel magnitude may lie from its peers' median, as a factor either way.
DEFAULT_MAGNITUDE = 3.0


@dataclass
class ScreenResult:
    """Per set key: the share of its scored images its peers agree with (NaN: none could be
    scored), and the refused keys with the reason."""

    scores: dict[int, float] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)


def screen_sets(
    sets: Mapping[int, SyntheticSet],
    net: nn.Module,
    threshold: float = DEFAULT_SCREEN_THRESHOLD,
    magnitude: float = DEFAULT_MAGNITUDE,
    min_peers: int = 2,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> ScreenResult:
    """Score every set of ``sets`` by its peers' agreement with its labels and refuse those
    below ``threshold`` (see the module)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if not magnitude > 1 or not math.isfinite(magnitude):
        raise ValueError(f"magnitude must be a finite factor > 1, got {magnitude}")
    if min_peers < 1:
        raise ValueError(f"min_peers must be >= 1, got {min_peers}")
    keys = list(sets)
    labels = {k: _hard_labels(sets[k]) for k in keys}
    spaces = [
        {k: _pixels(sets[k]) for k in keys},
        {k: _embedding(sets[k], net, device, batch_size) for k in keys},
    ]
    rms = {k: float(spaces[0][k].double().pow(2).mean().sqrt()) for k in keys}
    result = ScreenResult()
    for key in keys:
        peers = [rms[k] for k in keys if k != key and math.isfinite(rms[k])]
        if peers:
            ratio = rms[key] / max(float(torch.tensor(peers).median()), 1e-12)
            if not 1 / magnitude <= ratio <= magnitude:
                result.scores[key] = 0.0
                result.refused[key] = (
                    f"screened out: its pixels' magnitude is {ratio:.3g}x the other uploads' "
                    f"median (allowed: a factor of {magnitude:g} either way)"
                )
                continue
        shares = [_agreement(key, space, labels, min_peers) for space in spaces]
        scored = [s for s in shares if not math.isnan(s)]
        result.scores[key] = min(scored) if scored else math.nan
        if scored and not min(scored) >= threshold:
            names = ("pixels", "embedding")
            detail = ", ".join(f"{n} {s:.2f}" for n, s in zip(names, shares, strict=True))
            result.refused[key] = (
                f"screened out: the other uploads' class means classify {min(scored):.0%} of its "
                f"images as labelled ({detail}; threshold {threshold:g})"
            )
    return result


def _agreement(
    key: int,
    features: Mapping[int, torch.Tensor],
    labels: Mapping[int, torch.Tensor],
    min_peers: int,
) -> float:
    """The share of set ``key``'s images whose nearest reference class mean (built from the
    other sets) is their label, over the images whose class has a reference."""
    others = [k for k in features if k != key]
    means: dict[int, list[torch.Tensor]] = {}
    for k in others:
        for c in labels[k].unique().tolist():
            means.setdefault(int(c), []).append(features[k][labels[k] == c].mean(0))
    classes = sorted(c for c, m in means.items() if len(m) >= min_peers)
    if not classes:
        return math.nan
    reference = torch.stack([torch.stack(means[c]).median(0).values for c in classes])
    mine, y = features[key], labels[key]
    scored = torch.isin(y, torch.tensor(classes))
    if not bool(scored.any()):
        return math.nan
    x = mine[scored]
    finite = torch.isfinite(x).all(1)
    predicted = torch.full((x.shape[0],), -1, dtype=torch.long)
    if bool(finite.any()):
        nearest = torch.cdist(x[finite].double(), reference.double()).argmin(1)
        predicted[finite] = torch.tensor(classes)[nearest]
    return float((predicted == y[scored]).double().mean())


def _hard_labels(syn: SyntheticSet) -> torch.Tensor:
    with torch.no_grad():
        targets = syn.targets().cpu()
    # Soft labels are screened under their most likely class.
    return targets.argmax(1) if targets.is_floating_point() else targets.long()


def _pixels(syn: SyntheticSet) -> torch.Tensor:
    with torch.no_grad():
        return syn.images().detach().float().cpu().flatten(1)


def _embedding(
    syn: SyntheticSet, net: nn.Module, device: torch.device | str, batch_size: int
) -> torch.Tensor:
    net = net.to(device).eval()
    with torch.no_grad():
        images = syn.images().detach().float()
        return torch.cat(
            [embed(net, part.to(device)).float().cpu() for part in images.split(batch_size)]
        )
