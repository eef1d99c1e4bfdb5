"""Federated partitions (flwr-datasets over in-memory labels) and presets."""

from __future__ import annotations

import pytest
import torch
from fedcl_dd.scenarios.federated import (
    Partitioning,
    class_histogram,
    client_data,
    format_histogram,
    parse_preset,
    partition_indices,
    plot_histogram,
)


@pytest.fixture(scope="module")
def labels(digits):
    return digits.train_y


@pytest.mark.parametrize(
    "scheme",
    [
        Partitioning("iid", 4),
        Partitioning("dirichlet", 5, alpha=0.3),
        Partitioning("pathological", 10, classes_per_client=2),
    ],
    ids=["iid", "dirichlet", "pathological"],
)
def test_partitions_are_disjoint_cover_and_repeat(labels, scheme):
    parts = partition_indices(labels, scheme)
    assert len(parts) == scheme.num_partitions
    rows = torch.cat(parts)
    assert rows.unique().numel() == rows.numel(), "a row was given to two clients"
    assert rows.numel() == labels.numel(), "rows were left out"
    again = partition_indices(labels, scheme)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True)), (
        "same seed, different partition"
    )


def test_pathological_clients_hold_k_classes(labels):
    parts = partition_indices(
        labels, Partitioning("pathological", 10, classes_per_client=2, seed=3)
    )
    assert all(labels[p].unique().numel() <= 2 for p in parts)


def test_smaller_alpha_is_more_skewed(labels):
    def mean_classes(alpha: float) -> float:
        parts = partition_indices(labels, Partitioning("dirichlet", 5, alpha=alpha, seed=1))
        # classes holding at least 5% of a client's rows
        return (
            sum(int((torch.bincount(labels[p], minlength=10) > 0.05 * len(p)).sum()) for p in parts)
            / 5
        )

    assert mean_classes(0.1) < mean_classes(100.0) - 3


def test_iid_depends_on_seed(labels):
    a = partition_indices(labels, Partitioning("iid", 4, seed=1))[0]
    b = partition_indices(labels, Partitioning("iid", 4, seed=2))[0]
    assert not torch.equal(a, b)


def test_presets_parse_and_bad_names_are_refused():
    p = parse_preset("mnist-dir0.1-10")
    assert (p.dataset, p.partitioning.kind, p.partitioning.alpha, p.num_clients) == (
        "mnist",
        "dirichlet",
        0.1,
        10,
    )
    assert parse_preset("cifar10-path2-10").partitioning.classes_per_client == 2
    refusals = {
        "mnist-dir-10": "unknown preset 'mnist-dir-10': expected <dataset>-",
        "imagenet-iid-4": "unknown preset .*dataset in \\['cifar10', 'digits', 'mnist'\\]",
        "digits-iid": "unknown preset 'digits-iid'",
        "digits-path11-4": "11 classes per client, but digits has 10",
        "digits-dir0-4": "needs alpha > 0",
    }
    for bad, reason in refusals.items():
        with pytest.raises(ValueError, match=reason):
            parse_preset(bad)


def test_client_data_split_histogram_and_plot(tmp_path):
    preset = parse_preset("digits-path2-10")
    data = client_data(preset, 3)
    assert len(data.classes) <= 2 and data.test_y.numel() > 0
    assert set(data.test_y.tolist()) <= set(data.classes)
    hist = class_histogram(preset)
    assert (
        hist.shape == (10, 10) and int(hist[3].sum()) == data.train_y.numel() + data.test_y.numel()
    )
    assert format_histogram(hist).splitlines()[0].startswith("client")
    assert plot_histogram(hist, tmp_path / "h.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="partition-id 10"):
        client_data(preset, 10)
