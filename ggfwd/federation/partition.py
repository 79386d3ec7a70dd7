"""Splitting one data set into clients' private partitions, seeded.

- `iid`: a seeded permutation cut into near-equal parts.
- `dirichlet:ALPHA`: label skew as in the federated-learning literature (FedKSeed, DeComFL use alpha 0.5):
  for each label, the share of its examples that goes to each client is drawn from Dirichlet(alpha, ..., alpha);
  small alpha gives clients dominated by one label. Every example goes to exactly one client; a client that
  would be left empty receives one example from the largest client.
- `count:N1,N2,...`: consecutive blocks of a seeded permutation with the given sizes (the rest unused).

Each partition is an array of example indices into the data set, sorted.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

_PARTITION_STREAM = 0x9A27


def parse_spec(spec: str) -> tuple[str, float | list[int] | None]:
    """'iid', 'dirichlet:0.5' or 'count:10,20' -> (kind, parameter); one-line UserError otherwise."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise UserError(f"--partition dirichlet:ALPHA needs a number, got '{spec}'") from None
        if not (alpha > 0 and np.isfinite(alpha)):
            raise UserError(f"--partition dirichlet alpha must be a positive number, got '{spec}'")
        return "dirichlet", alpha
    if kind == "count":
        try:
            sizes = [int(x) for x in arg.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--partition count:N1,N2,... needs integers, got '{spec}'") from None
        if not sizes or min(sizes) < 1:
            raise UserError(f"--partition count sizes must be >= 1, got '{spec}'")
        return "count", sizes
    raise UserError(f"--partition must be iid, dirichlet:ALPHA or count:N1,N2,..., got '{spec}'")


def partition(spec: str, labels: np.ndarray | None, n_examples: int, n_clients: int, seed: int) -> list[np.ndarray]:
    """Client -> sorted example indices. `labels` (one int per example) is needed for dirichlet."""
    kind, arg = parse_spec(spec)
    if n_clients < 1:
        raise UserError(f"--clients must be >= 1, got {n_clients}")
    if n_examples < n_clients:
        raise UserError(f"{n_examples} examples cannot give each of {n_clients} clients at least one")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, _PARTITION_STREAM])))
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n_examples), n_clients)]
    if kind == "count":
        if len(arg) != n_clients:
            raise UserError(f"--partition count lists {len(arg)} sizes for {n_clients} clients")
        if sum(arg) > n_examples:
            raise UserError(f"--partition count asks for {sum(arg)} examples; the data has {n_examples}")
        order = rng.permutation(n_examples)
        ends = np.cumsum(arg)
        return [np.sort(order[e - n:e]) for n, e in zip(arg, ends)]
    if labels is None:
        raise UserError("--partition dirichlet needs labelled (classification) data")
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(n_clients, float(arg)))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(n_clients):  # nobody is left with no data
        if not parts[client]:
            donor = max(range(n_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of the share of the client's most common label (1/n_labels: balanced; 1: one label
    per client)."""
    labels = np.asarray(labels)
    shares = [np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))
