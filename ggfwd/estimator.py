"""Zeroth-order gradient estimates from loss differences on one fixed batch layout.

For each direction z_k of a step (regenerated from seeds, see `perturbation`), the estimator scores the
same plan at `theta + eps z_k` and `theta - eps z_k` (central differences; or at `theta + eps z_k` against one
shared `L(theta)`, forward differences; or at `theta + eps z_k` only, centred on the step's mean; or also at
`theta +- 2 eps z_k`, fourth-order central differences) and keeps one scalar per direction:

    central:  s_k = (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps)                 2 passes per direction
    central4: s_k = (8 (L(+eps z_k) - L(-eps z_k)) - (L(+2 eps z_k) - L(-2 eps z_k))) / (12 eps)   4 passes
    forward:  s_k = (L(theta + eps z_k) - L(theta)) / eps                           1 per direction + 1
    centred:  s_k = K / (K - 1) * (L(theta + eps z_k) - mean_j L(theta + eps z_j)) / eps    1 per direction

Forward differences carry the curvature term `eps/2 z^T H z`, which is positive and nearly the same for
every direction: on Gemma-3-270M Q4_K_M at eps 0.1 it made all 8 scalars of a step positive, and
`mean_k s_k z_k` then adds a random vector of that size to the estimate. Centring on the step's mean removes
that common offset (and L(theta) is then not needed at all); the factor K/(K-1) undoes the shrinkage the
centring causes, so the estimate stays unbiased to first order. Needs K >= 2.

Central differences carry the loss's third derivative along z: s_k = dL/dz + eps^2/6 d3L/dz3 + O(eps^4). On
Gemma-3-270M at eps 0.1 that term, not quantization noise, is most of the error against exact derivatives
(README, fidelity). `central4` is the Richardson combination (4 D(eps) - D(2 eps)) / 3 of the central
differences at eps and 2 eps, which cancels it, for twice the passes and about 1.3x the noise (the weights
8, 8, 1, 1 over 12 against 1, 1 over 2).

The scalars are the only per-direction output: with the seeds they are the whole estimate, which
`rebuild` turns back into `g = mean_k s_k z_k` over the masked coordinates (so a federated client can send
seeds and scalars, and a server can replay them).

Option `normalize="std"` (after FZOO) divides the differences by the standard deviation of the step's
perturbed losses instead of by eps, making s_k dimensionless; with one central direction it reduces to the
sign of the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .perturbation import Perturbations

SCHEMES = ("central", "forward", "centred", "central4")
NORMALIZE = ("none", "std")


@dataclass
class StepEstimate:
    """What one step's perturbed evaluations produced: the scalars (the estimate, with the seeds) and
    bookkeeping."""

    step: int
    client: int
    scalars: np.ndarray  # float32 (the wire type), one per direction
    loss: float  # estimate of L(theta) on the batch: mean of the perturbed losses, or L(theta) itself
    losses_plus: np.ndarray
    losses_minus: np.ndarray | None  # central only
    loss_zero: float | None  # forward only
    accuracy: float | None  # batch accuracy at theta (forward) or mean over the perturbed passes
    forward_passes: int
    tokens: int
    finite: bool = field(default=True)
    losses_wide: np.ndarray | None = None  # central4 only: losses at +2 eps z_k and -2 eps z_k, shape (2, K)


def passes_per_step(scheme: str, directions: int) -> int:
    """Forward passes one step of `directions` directions costs under `scheme`."""
    return {"central": 2 * directions, "forward": directions + 1, "centred": directions,
            "central4": 4 * directions}[scheme]


def check_settings(eps: float, directions: int, scheme: str = "central", normalize: str = "none") -> None:
    if not (eps > 0 and np.isfinite(eps)):
        raise UserError(f"eps must be a positive number, got {eps}")
    if directions < 1:
        raise UserError(f"directions per step must be >= 1, got {directions}")
    if scheme not in SCHEMES:
        raise UserError(f"difference scheme must be one of {', '.join(SCHEMES)}, got '{scheme}'")
    if scheme == "centred" and directions < 2:
        raise UserError("the centred scheme needs at least 2 directions per step")
    if normalize not in NORMALIZE:
        raise UserError(f"normalize must be one of {', '.join(NORMALIZE)}, got '{normalize}'")


class Estimator:
    """Scores perturbed adapters through a Session and returns the per-direction scalars.

    Buffers for theta +- eps z and for z are allocated once; the hot path does no file I/O, no tokenizing
    and no Python loop over tensor elements.
    """

    def __init__(self, session, perturbations: Perturbations, eps: float, directions: int = 1,
                 scheme: str = "central", normalize: str = "none"):
        check_settings(eps, directions, scheme, normalize)
        self.session, self.perturbations = session, perturbations
        self.eps, self.directions, self.scheme, self.normalize = float(eps), int(directions), scheme, normalize
        n = perturbations.n
        self._z = np.empty(n, dtype=np.float32)
        self._work = np.empty(perturbations.size, dtype=np.float32)
        self._base = np.empty(n, dtype=np.float32)

    def _score(self, theta: np.ndarray, index: np.ndarray, delta: np.ndarray | None, plan):
        work = self._work
        work[...] = theta
        if delta is not None:
            work[index] += delta
        self.session.set_params(work)
        return self.session.score(plan)

    def estimate(self, theta: np.ndarray, plan, step: int, client: int = 0,
                 directions: int | None = None, indices=None) -> StepEstimate:
        """Evaluate the directions (client, step, 0..K-1) around `theta` (full flat vector) on `plan`; K is
        `directions`, by default the estimator's own count. `indices`: score the directions (client, step, j)
        for these j instead (candidate sampling, see ggfwd.sampling). `plan` may be a list of K plans, one batch
        per direction (a direction's + and - passes still share theirs); the schemes that share one pass or one
        mean across directions (forward, centred) need a single plan."""
        p = self.perturbations
        idx, eps = p.index, self.eps
        n_dir = self.directions if directions is None else int(directions)
        if indices is not None:
            n_dir = len(indices)
        check_settings(eps, n_dir, self.scheme, self.normalize)
        plans = plan if isinstance(plan, list) else [plan] * n_dir
        if len(plans) != n_dir or (isinstance(plan, list) and self.scheme in ("forward", "centred")):
            raise ValueError(f"{len(plans)} plans for {n_dir} directions under the {self.scheme} scheme")
        plus = np.zeros(n_dir)
        two_sided = self.scheme in ("central", "central4")
        minus = np.zeros(n_dir) if two_sided else None
        wide = np.zeros((2, n_dir)) if self.scheme == "central4" else None
        loss_zero, accs, passes, tokens = None, [], 0, 0
        if self.scheme == "forward":
            s = self._score(theta, idx, None, plans[0])
            loss_zero, passes, tokens = s.loss, 1, s.n_tokens
            accs.append(s.accuracy)
        for k in range(n_dir):
            z = p.masked(step, client, k if indices is None else int(indices[k]), out=self._z)
            s = self._score(theta, idx, eps * z, plans[k])
            plus[k] = s.loss
            passes, tokens = passes + 1, tokens + s.n_tokens
            if self.scheme != "forward":
                accs.append(s.accuracy)
            if two_sided:
                s = self._score(theta, idx, -eps * z, plans[k])
                minus[k] = s.loss
                passes, tokens = passes + 1, tokens + s.n_tokens
                accs.append(s.accuracy)
            if wide is not None:
                for side, sign in enumerate((2.0, -2.0)):
                    s = self._score(theta, idx, (sign * eps) * z, plans[k])
                    wide[side, k] = s.loss
                    passes, tokens = passes + 1, tokens + s.n_tokens
        self.session.set_params(theta)  # leave the session at theta
        losses = plus if minus is None else np.concatenate([plus, minus])
        finite = bool(np.all(np.isfinite(losses)) and (loss_zero is None or np.isfinite(loss_zero))
                      and (wide is None or np.all(np.isfinite(wide))))
        if self.scheme == "central":
            diff, denom = plus - minus, 2 * eps
            loss = float(np.mean(losses))
        elif self.scheme == "central4":
            diff, denom = 8 * (plus - minus) - (wide[0] - wide[1]), 12 * eps
            loss = float(np.mean(losses))
        elif self.scheme == "forward":
            diff, denom = plus - loss_zero, eps
            loss = float(loss_zero)
        else:  # centred
            k = n_dir
            diff, denom = (plus - plus.mean()) * (k / (k - 1)), eps
            loss = float(plus.mean())
        if self.normalize == "std" and finite:
            spread = float(np.std(losses if loss_zero is None else np.append(plus, loss_zero)))
            denom = denom / eps * spread if spread > 0 else np.inf
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            scalars = (diff / denom).astype(np.float32)  # what a federated client sends
        acc = [a for a in accs if a is not None]
        return StepEstimate(step, client, scalars, loss, plus, minus, loss_zero,
                            float(np.mean(acc)) if acc else None, passes, tokens,
                            finite and bool(np.all(np.isfinite(scalars))), wide)


def rebuild(perturbations: Perturbations, step: int, client: int, scalars, out: np.ndarray | None = None,
            z: np.ndarray | None = None, weight: float | None = None) -> np.ndarray:
    """The masked estimate `sum_k w s_k z_k` of one (step, client) from its seeds and scalars alone, float32 of
    length `perturbations.n`; `w` is `weight`, by default 1 / (number of scalars), i.e. the client's mean."""
    scalars = np.asarray(scalars, dtype=np.float64)
    weight = 1.0 / len(scalars) if weight is None else weight
    if out is None:
        out = np.empty(perturbations.n, dtype=np.float32)
    if z is None:
        z = np.empty(perturbations.n, dtype=np.float32)
    out[...] = 0
    for k, s in enumerate(scalars):
        perturbations.masked(step, client, k, out=z)
        out += np.float32(s * weight) * z
    return out


@dataclass
class Aggregate:
    """A round's combined estimate and how it was formed."""

    gradient: np.ndarray | None  # over the masked coordinates; None when no report was usable
    clients: int  # reports used
    directions: int  # scalars used
    clipped: int  # scalars clipped to the threshold
    threshold: float  # |s| above this was clipped (inf: no clipping)
    effective: float = 0.0  # directions an equal-weight average with the same variance would hold (see aggregate)


WEIGHTINGS = ("equal", "examples", "directions")


def clip_threshold(reports, clip: float) -> float:
    """`clip` x the median over clients of each client's median |s| (inf when `clip` is 0). A client's vote
    counts once however many directions it sent, so one hostile client cannot move the threshold far."""
    if not clip or not reports:
        return float("inf")
    medians = [float(np.median(np.abs(np.asarray(s, dtype=np.float64)))) for _, s in reports]
    return clip * float(np.median(medians))


def aggregate(perturbations: Perturbations, step: int, reports, clip: float = 0.0,
              out: np.ndarray | None = None, weights=None, draws=None) -> Aggregate:
    """The round's estimate from (client, scalars) pairs, or (client, scalars, indices) triples whose scalar k
    belongs to direction (step, client, indices[k]) (candidate sampling); `draws` (one per report) replaces
    `step` in a report's seeds when its directions were drawn in another round (asynchronous rounds and client
    memory: clientmemory.py). Client-balanced: each report is first
    averaged over its own directions, then the clients' means are combined with weights w_c (`weights`, one per
    report in order, relative; None: equal):

        g = sum_c (w_c / W) (1 / K_c) sum_k s_ck z_ck,        W = sum_c w_c

    so a client's weight is its share (of the clients, or of the training examples: see `client_weights`), not
    its speed: a client that scored more directions lowers the noise of its own term, not its say (FedNova's
    normalisation). With `clip` > 0 each scalar is first limited to +-`clip_threshold` (an outlier or hostile
    client's scalars cannot exceed what honest clients send). Reports with non-finite or no scalars are left
    out (their weights with them). One client's report gives its mean `mean_k s_k z_k` whatever its weight:
    single-device training is the one-client case of this function.

    `effective` is 1 / sum_c (w_c / W)^2 / K_c: the number of directions an equal-weight average with the same
    estimator variance would hold (M K for M clients of K directions at equal weights; fewer when weights are
    unequal). The step-size rule (`update.UpdateRule.lr_scale`) scales with it.

    The result is a pure function of the inputs, so the server and every client replaying the round get the
    same bits."""
    if weights is not None and len(weights) != len(reports):
        raise ValueError("one weight per report")
    if draws is not None and len(draws) != len(reports):
        raise ValueError("one draw per report")
    rows = [(int(r[0]), np.asarray(r[1], dtype=np.float32), r[2] if len(r) > 2 else None,
             1.0 if weights is None else float(weights[j]), step if draws is None else int(draws[j]))
            for j, r in enumerate(reports)]
    usable = [row for row in rows if row[1].size and np.all(np.isfinite(row[1])) and row[3] > 0 and np.isfinite(row[3])]
    if not usable:
        return Aggregate(None, 0, 0, 0, float("inf"))
    threshold = clip_threshold([(row[0], row[1]) for row in usable], clip)
    n = sum(row[1].size for row in usable)
    total_weight = sum(row[3] for row in usable)
    total = np.zeros(perturbations.n, dtype=np.float32) if out is None else out
    total[...] = 0
    z = np.empty(perturbations.n, dtype=np.float32)
    clipped, spread = 0, 0.0
    for client, scalars, indices, w, draw in usable:
        share = w / total_weight  # exactly 1.0 for a single report
        spread += share * share / scalars.size
        values = scalars.astype(np.float64)
        if np.isfinite(threshold):
            clipped += int(np.count_nonzero(np.abs(values) > threshold))
            values = np.clip(values, -threshold, threshold)
        for k, s in enumerate(values):
            perturbations.masked(draw, client, k if indices is None else int(indices[k]), out=z)
            total += np.float32(s * share / scalars.size) * z
    return Aggregate(total, len(usable), n, clipped, threshold, 1.0 / spread)


def client_weights(weighting: str, reports, examples=None, directions=None, cap: float = 4.0,
                   population=None) -> list[float] | None:
    """Relative weights of a round's reports (in their order) under `weighting`:

    - `equal`: every client counts the same (None: `aggregate`'s default);
    - `examples`: by the client's training-set size (`examples[client]`), so that with clients sampled
      uniformly the expected update is the pooled data's gradient under label or quantity skew. A client's
      claim is capped at `cap` x the median claim of the round (of `population`, every known client's claim,
      when given: with client memory a round may hold a single report), so that a node claiming a huge data
      set cannot take the update over;
    - `directions`: by the directions the client scored (every direction weighs the same: ggfwd's rule before
      client balancing; a fast client's weight then grows with its speed).
    """
    if weighting == "equal":
        return None
    if weighting == "directions":
        return [float(len(r[1])) for r in reports]
    if weighting != "examples":
        raise UserError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got '{weighting}'")
    sizes = [float(max(1, examples[int(r[0])])) for r in reports]
    if not sizes:
        return []
    limit = cap * float(np.median(sizes if population is None else [max(1, int(e)) for e in population]))
    return [min(s, limit) for s in sizes]
