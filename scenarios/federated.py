"""Federated partitions of the core's datasets, and named presets.

Partitioning goes through flwr-datasets' partitioners (IID, Dirichlet, pathological),
applied to the labels in memory: a ``datasets.Dataset`` of labels and row indices is built
locally, so nothing is downloaded, and every client slices its own tensors from the
indices. The same seed gives every process (server, simulated or deployed clients) the
same partitions.

A preset names a dataset, a partitioning and a client count, e.g. ``mnist-dir0.1-10``
(Dirichlet alpha 0.1 over 10 clients), ``cifar10-path2-10`` (2 classes per client),
``digits-iid-4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedcl_dd.data import SPECS, Dataset, DatasetSpec, load_dataset

__all__ = [
    "PRESETS",
    "ClientData",
    "Partitioning",
    "Preset",
    "cached_dataset",
    "class_histogram",
    "client_data",
    "format_histogram",
    "parse_preset",
    "partition_indices",
    "plot_histogram",
]

KINDS = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class Partitioning:
    """How labels are spread over clients.

    ``iid``: a seeded shuffle cut into equal shards. ``dirichlet``: per class, client
    shares drawn from Dir(``alpha``) (Hsu et al. 2019); small alpha = few classes per
    client. ``pathological``: ``classes_per_client`` classes each (McMahan et al. 2017).
    """

    kind: str
    num_partitions: int
    alpha: float | None = None
    classes_per_client: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown partitioning {self.kind!r}; choose one of {list(KINDS)}")
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if self.kind == "dirichlet" and not (self.alpha and self.alpha > 0):
            raise ValueError(f"dirichlet partitioning needs alpha > 0, got {self.alpha}")
        if self.kind == "pathological" and not (
            self.classes_per_client and self.classes_per_client > 0
        ):
            raise ValueError(
                f"pathological partitioning needs classes_per_client >= 1, got {self.classes_per_client}"
            )


@dataclass(frozen=True)
class Preset:
    """A named federated scenario: dataset + partitioning (+ the clients' held-out share)."""

    name: str
    dataset: str
    partitioning: Partitioning
    test_fraction: float = 0.2  # of each client's partition, kept for its local evaluation

    @property
    def num_clients(self) -> int:
        return self.partitioning.num_partitions

    @property
    def spec(self) -> DatasetSpec:
        return SPECS[self.dataset]


_PRESET_RE = re.compile(
    r"^(?P<ds>[a-z0-9]+)-(?P<part>iid|dir(?P<alpha>[0-9.]+)|path(?P<k>[0-9]+))-(?P<n>[0-9]+)$"
)

#: Presets used in the docs and benchmarks; any name of the same pattern also parses.
PRESETS = (
    "digits-iid-4",
    "digits-dir0.5-4",
    "digits-path2-10",
    "mnist-iid-10",
    "mnist-dir0.1-10",
    "mnist-dir0.5-10",
    "mnist-path2-10",
    "cifar10-dir0.1-10",
    "cifar10-dir0.5-10",
    "mnist-dir0.5-100",
)


def parse_preset(name: str, seed: int = 42) -> Preset:
    """``<dataset>-<iid|dirALPHA|pathK>-<clients>`` as a :class:`Preset`."""
    m = _PRESET_RE.match(name)
    if m is None or m["ds"] not in SPECS:
        raise ValueError(
            f"unknown preset {name!r}: expected <dataset>-<iid|dir<alpha>|path<k>>-<clients> with dataset in "
            f"{sorted(SPECS)}, e.g. {', '.join(PRESETS[:4])}"
        )
    n = int(m["n"])
    if m["part"] == "iid":
        part = Partitioning("iid", n, seed=seed)
    elif m["alpha"] is not None:
        try:
            alpha = float(m["alpha"])
        except ValueError:  # the pattern admits e.g. "dir0.5.1"
            raise ValueError(
                f"preset {name!r}: alpha {m['alpha']!r} is not a number; write e.g. "
                f"{m['ds']}-dir0.5-{n}"
            ) from None
        part = Partitioning("dirichlet", n, alpha=alpha, seed=seed)
    else:
        k = int(m["k"])
        if k > SPECS[m["ds"]].num_classes:
            raise ValueError(
                f"preset {name!r}: {k} classes per client, but {m['ds']} has {SPECS[m['ds']].num_classes}"
            )
        part = Partitioning("pathological", n, classes_per_client=k, seed=seed)
    return Preset(name, m["ds"], part)


def partition_indices(labels: torch.Tensor, scheme: Partitioning) -> list[torch.Tensor]:
    """Row indices of each client's share of ``labels`` (int64 tensors, one per client).

    Runs flwr-datasets' partitioner over an in-memory ``datasets.Dataset`` of the labels.
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    rows = torch.arange(len(labels))
    if scheme.kind == "iid":
        # IidPartitioner cuts contiguous shards; a seeded shuffle of the rows makes them random.
        rows = torch.randperm(len(labels), generator=torch.Generator().manual_seed(scheme.seed))
    table = datasets.Dataset.from_dict({"label": labels[rows].tolist(), "row": rows.tolist()})
    if scheme.kind == "iid":
        partitioner = IidPartitioner(scheme.num_partitions)
    elif scheme.kind == "dirichlet":
        # min_partition_size: flwr-datasets resamples until every client holds this many rows.
        # Its default of 10 cannot be met by small datasets split many ways; scale it down, but
        # never to 0: a client without rows has nothing to distill or train on.
        min_size = max(1, min(10, len(labels) // (2 * scheme.num_partitions)))
        partitioner = DirichletPartitioner(
            scheme.num_partitions,
            "label",
            scheme.alpha,
            min_partition_size=min_size,
            seed=scheme.seed,
        )
    else:
        # "first-deterministic": client i's first class is i mod C, so no class is left out
        # when there are at least as many clients as classes (pure "random" may drop some).
        partitioner = PathologicalPartitioner(
            scheme.num_partitions,
            "label",
            scheme.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=scheme.seed,
        )
    partitioner.dataset = table
    return [
        torch.tensor(partitioner.load_partition(i)["row"], dtype=torch.long)
        for i in range(scheme.num_partitions)
    ]


@dataclass
class ClientData:
    """One client's local data: a training share and a held-out share of its partition."""

    partition_id: int
    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def classes(self) -> list[int]:
        """Classes with at least one training sample."""
        return sorted(int(c) for c in self.train_y.unique())


@lru_cache(maxsize=4)
def _dataset(name: str, root: str | None) -> Dataset:
    return load_dataset(name, root)


def cached_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """``load_dataset``, once per process: Ray reuses client processes across rounds, and the
    server reads the same data for partitions and evaluation."""
    return _dataset(name, str(root) if root is not None else None)


@lru_cache(maxsize=8)
def _partitions(name: str, root: str | None, scheme: Partitioning) -> tuple[torch.Tensor, ...]:
    return tuple(partition_indices(cached_dataset(name, root).train_y, scheme))


def _split_fix(preset: Preset) -> str:
    """What to change in ``preset`` when its clients cannot all get training records."""
    part, n = preset.partitioning, preset.num_clients
    if part.kind == "dirichlet":  # a larger alpha spreads each class more evenly
        return f"use fewer clients than {n} or a larger alpha than {part.alpha:g}"
    if part.kind == "pathological" and (part.classes_per_client or 0) > 1:
        # each class is shared by about clients x k / classes of them
        return (
            f"use fewer clients than {n} or fewer classes per client than {part.classes_per_client}"
        )
    return f"use fewer clients than {n}"


def _client_rows(preset: Preset, root: str | None) -> tuple[torch.Tensor, ...]:
    """Every client's rows under ``preset``, refused unless each client gets a training record.

    Checked here, where the server's class histogram and every client read their partitions,
    so that a preset split too thin fails before round 1 rather than as empty clients in it.
    """
    labels = cached_dataset(preset.dataset, root).train_y
    counts = torch.bincount(labels, minlength=preset.spec.num_classes)
    held = (
        f"{preset.dataset} has {labels.numel()} training records "
        f"({int(counts.min())} to {int(counts.max())} per class)"
    )
    n = preset.num_clients
    if n > labels.numel():
        raise ValueError(
            f"preset {preset.name!r} is split too thin: {held} for {n} clients, so some "
            f"clients would hold none. Use at most {labels.numel()} clients"
        )
    try:
        rows = _partitions(preset.dataset, root, preset.partitioning)
    except ValueError as exc:  # flwr-datasets gives up (e.g. Dirichlet draws below min size)
        raise ValueError(
            f"preset {preset.name!r} is split too thin: {held} for {n} clients, and "
            f"flwr-datasets' partitioner refused ({exc}). {_split_fix(preset).capitalize()}"
        ) from exc
    # A client trains on what its local test share leaves (client_data), so count that.
    empty = [i for i, r in enumerate(rows) if len(r) - _test_size(len(r), preset) < 1]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ValueError(
            f"preset {preset.name!r} is split too thin: {held} for {n} clients, and "
            f"{len(empty)} of them (partition ids {shown}) get no training record, so nothing "
            f"to distill or train on. {_split_fix(preset).capitalize()}"
        )
    return rows


def _test_size(n: int, preset: Preset) -> int:
    """How many of a partition's ``n`` rows the client keeps for its local evaluation."""
    return round(n * preset.test_fraction) if n > 1 else 0


def client_data(preset: Preset, partition_id: int, root: str | Path | None = None) -> ClientData:
    """Client ``partition_id``'s data under ``preset``, read from the data root (``root``)."""
    if not 0 <= partition_id < preset.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is outside preset {preset.name!r}, which has {preset.num_clients} "
            f"clients (0..{preset.num_clients - 1}); check the SuperNode's --node-config"
        )
    key = str(root) if root is not None else None
    ds = cached_dataset(preset.dataset, key)
    rows = _client_rows(preset, key)[partition_id]
    # A seeded split of the partition: the client's local test share.
    gen = torch.Generator().manual_seed(preset.partitioning.seed * 1000 + partition_id)
    rows = rows[torch.randperm(len(rows), generator=gen)]
    n_test = _test_size(len(rows), preset)
    test, train = rows[:n_test], rows[n_test:]
    return ClientData(
        partition_id,
        ds.spec,
        ds.train_x[train],
        ds.train_y[train],
        ds.train_x[test],
        ds.train_y[test],
    )


def class_histogram(preset: Preset, root: str | Path | None = None) -> torch.Tensor:
    """(clients, classes) counts of the training labels each client holds.

    Raises ``ValueError`` (naming the preset and the fix) if a client would hold no training
    record; the server reads this before round 1.
    """
    key = str(root) if root is not None else None
    labels = cached_dataset(preset.dataset, key).train_y
    parts = _client_rows(preset, key)
    return torch.stack(
        [torch.bincount(labels[p], minlength=preset.spec.num_classes) for p in parts]
    )


def format_histogram(hist: torch.Tensor) -> str:
    """A text table: one row per client, one column per class, and the row total."""
    width = max(5, len(str(int(hist.max()))) + 1)
    head = (
        "client"
        + "".join(f"{c:>{width}}" for c in range(hist.shape[1]))
        + f"{'total':>{width + 2}}"
    )
    rows = [
        f"{i:>6}" + "".join(f"{int(v):>{width}}" for v in row) + f"{int(row.sum()):>{width + 2}}"
        for i, row in enumerate(hist)
    ]
    return "\n".join([head, *rows])


def plot_histogram(hist: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """A stacked bar chart of each client's class counts, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * hist.shape[0] + 2), 3.5))
    bottom = torch.zeros(hist.shape[0])
    cmap = plt.get_cmap("tab10" if hist.shape[1] <= 10 else "tab20")
    for c in range(hist.shape[1]):
        ax.bar(
            range(hist.shape[0]),
            hist[:, c].float(),
            bottom=bottom,
            color=cmap(c % cmap.N),
            label=str(c),
        )
        bottom += hist[:, c].float()
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training samples")
    ax.set_title(title or "class histogram per client")
    ax.legend(title="class", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
