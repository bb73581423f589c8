"""The paper's evaluation protocols (DESIGN.md section 5) as index splits with a fixed seed.

- Seen identities: per identity, ``query_per_class`` images are queries and the rest form the
  database, which is also the training set.
- Unseen identities: training uses ``train_classes`` identities only; the database and queries
  come from the other identities, split per identity as above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RetrievalSplit:
    """Index tensors into one data set."""

    protocol: str
    train: torch.Tensor
    database: torch.Tensor
    query: torch.Tensor


def _per_class_split(labels: torch.Tensor, classes: torch.Tensor, query_per_class: int, g: torch.Generator,
                     class_names: list[str] | None):
    counts = torch.bincount(labels, minlength=int(classes.max()) + 1)[classes]
    few = [(c, n) for c, n in zip(classes.tolist(), counts.tolist()) if n <= query_per_class]
    if few:
        shown = ", ".join(f"{class_names[c] if class_names else c} ({n})" for c, n in few[:5])
        who = "1 identity has" if len(few) == 1 else f"{len(few)} identities have"
        raise ValueError(f"{who} no more than query_per_class={query_per_class} items, none left for the database: "
                         f"{shown}{', ...' if len(few) > 5 else ''}; remove them or lower query_per_class")
    database, query = [], []
    for c in classes.tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        query.append(members[:query_per_class])
        database.append(members[query_per_class:])
    return torch.cat(database).sort().values, torch.cat(query).sort().values


def seen_split(labels: torch.Tensor, query_per_class: int = 3, seed: int = 0,
               class_names: list[str] | None = None) -> RetrievalSplit:
    """Seen-identity protocol: database = training set, queries are held-out images of the same
    identities. ``class_names`` name the identities in errors."""
    if query_per_class < 1:
        raise ValueError(f"query_per_class must be >= 1, got {query_per_class}")
    g = torch.Generator().manual_seed(seed)
    database, query = _per_class_split(labels, labels.unique(), query_per_class, g, class_names)
    return RetrievalSplit("seen", database, database, query)


def unseen_split(labels: torch.Tensor, train_classes: int, query_per_class: int = 3, seed: int = 0,
                 class_names: list[str] | None = None) -> RetrievalSplit:
    """Unseen-identity protocol: train on ``train_classes`` identities chosen with the seed;
    database and queries from the remaining identities. ``class_names`` name the identities in errors."""
    classes = labels.unique()
    if not 1 <= train_classes < len(classes):
        raise ValueError(f"train_classes must be in [1, {len(classes) - 1}] for {len(classes)} classes, got {train_classes}")
    if query_per_class < 1:
        raise ValueError(f"query_per_class must be >= 1, got {query_per_class}")
    g = torch.Generator().manual_seed(seed)
    classes = classes[torch.randperm(len(classes), generator=g)]
    train_set = classes[:train_classes]
    train = torch.nonzero(torch.isin(labels, train_set)).flatten()
    database, query = _per_class_split(labels, classes[train_classes:].sort().values, query_per_class, g,
                                       class_names)
    return RetrievalSplit("unseen", train, database, query)
