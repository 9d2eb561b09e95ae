"""MST-style DP synthesis from noisy marginals, implemented directly on numpy.

The mechanism follows MST (McKenna, Miklau, Sheldon 2021, "Winning the NIST Contest: A
scalable and general approach to differentially private synthetic data"): measure cheap
low-order marginals, privately select a maximum spanning tree of pairs that the cheap
measurements explain worst, measure the tree's marginals, make everything consistent, and
sample. We root the model at the label so that the label is linked to *every* column (a
tree alone would link it to one or two), which is what a model trained on the synthetic
rows needs. The structure is a tree-augmented naive Bayes: ``label -> every column`` plus a
tree among the other columns, each conditioned on the label.

Input: ``codes``, one row per person (the reader guarantees one row per person; the codes
come from :class:`privacy.synth.codec.Codec`, i.e. the contract's bins and vocabularies). So
adding or removing one person changes every count table below by exactly 1 in one cell:
each table has L2 sensitivity 1 and each selection score has sensitivity 1.

Releases, in order, each recorded as one ``GaussianStep(sigma, 1.0, 1)``:

1. **Anchors**: for every column ``j`` other than the label, the noisy 2-way table
   ``(label, j)`` (a 1-way marginal of ``j`` when there is no label). They carry the 1-way
   marginals (sum over the label) and the label link. Noise ``sigma_anchor`` each.
2. **Selection** (post-processing first: the anchors are denoised and every column's values
   are grouped for the pair tables, from the noisy anchors only; see ``_denoise``,
   ``_pair_values`` and ``_coarsen``): Kruskal's algorithm over the non-label columns, each of its
   ``k - 1`` rounds one exponential mechanism over the pairs that join two components, with
   score = L1 distance between the true ``(label, a, b)`` table and the one the noisy anchors
   predict if ``a`` and ``b`` were independent given the label (sensitivity 1). An exponential
   mechanism with parameter ``eps`` is ``eps``-bounded-range, hence ``eps**2 / 8``-zCDP
   (Cesar & Rogers 2021), whose RDP curve ``alpha * eps**2 / 8`` is exactly that of a
   sensitivity-1 Gaussian release with ``sigma = 2 / eps``: each round is recorded as
   ``GaussianStep(2 / eps, 1.0, 1)``, an exact upper bound on its RDP curve.
3. **Tree**: for every selected pair, the noisy 3-way table ``(label, a, b)``, noise
   ``sigma_tree`` each.

The split of the budget between the three is fixed in advance (:data:`ANCHOR_SHARE`,
:data:`SELECT_SHARE`, :data:`TREE_SHARE`, as shares of zCDP rho); the common scale comes
from ``privacy.accountant.calibrate_noise`` (see ``codec.plan_sigmas``), so the composed RDP
epsilon at ``delta`` is at most the target.

Estimation and sampling (post-processing of the noisy tables, no further cost): the label
marginal is the inverse-variance average of the anchors' label sums. Each anchor is denoised
(``_denoise``): an ordered column's noisy 1-way counts are fitted piecewise-constant and each
piece's total soft-thresholded, so that the empty ends of a wide declared domain (a lab value
declared 0 to 5,000) mostly get no rows from noise alone; the label splits each piece. A
numeric column on a linear scale whose noise is as large as its data (a few hundred persons
at epsilon 1) is then re-shaped by a mixture of one or two normals fitted to its noisy counts
(``privacy.noisy_counts``), which weighs the contract's ``typical`` range where it declares one.
Pair tables group each column into contiguous equal-mass values
(the commonest categories), as many as keep a cell's mean count near the tree tables' noise
(``_pair_values``: 2 per column for a few hundred persons at epsilon 1, up to
:data:`MAX_PAIR_VALUES` for tens of thousands). Tree tables are projected onto the
non-negative tables with the estimated totals (least squares) and raked (iterative
proportional fitting) to agree with the anchors on their shared 2-way margins, and rows are
drawn by ancestral sampling: label, then the tree's root column given the label, then each
child given the label and its parent; finally each coarse value is refined to a contract bin
from the denoised anchor, and the codec draws a value inside the bin.

Measured on public clinical tables of 432 to 7,874 persons beside SDV's GaussianCopula:
``benchmarks/bench_synth.py --tables public`` (``benchmarks/results/synth_public.md``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from connectors.scale_arrays import to_scale
from connectors.schema_columns import Role
from privacy.accountant import GaussianStep
from privacy.noisy_counts import Prior, project_to_simplex, rake, smooth_anchor
from privacy.synth.codec import (
    Codec,
    ColumnCodec,
    DPFit,
    ValueKind,
    plan_sigmas,
    sample_rows,
)

#: Shares of the budget (zCDP rho). The anchors carry the 1-way marginals and the label link
#: (what a model trained on the output needs), so they get most; selection needs little
#: (scores on thousands of persons are large beside its noise); the tree tables get the rest.
#: Chosen on the cohort (3k and 50k persons, epsilon 3): 0.6/0.1/0.3 beat 0.4/0.1/0.5 on
#: train-synthetic-test-real AUROC at 3k (0.689 vs 0.684, 3 seeds) and tied at 50k.
ANCHOR_SHARE = 0.6
SELECT_SHARE = 0.1
TREE_SHARE = 0.3
#: Most values a column keeps inside a pair table (contiguous, equal-mass groups of bins for
#: ordered columns; the commonest categories for the others). A 3-way table then has at most
#: label x 18 x 18 cells, so the noise per cell stays small beside the counts (8 lost 0.03 of
#: sdmetrics pair-trend score on the 50k cohort; 24 gained nothing). Fewer persons or more
#: noise keep fewer (``_pair_values``).
MAX_PAIR_VALUES = 16
#: A label with more values than this is not used as the root (its 3-way tables would be too
#: large); the model is then plain MST with the label as one more column.
MAX_ROOT_VALUES = 10
#: Rounds of iterative proportional fitting when a tree table is made consistent.
RAKE_ROUNDS = 25
#: Denoising of the anchors (``_denoise``): the penalty per piece of an ordered column's
#: piecewise-constant fit, in noise variances times ln(bins) ...
SEGMENT_PENALTY = 0.5
#: ... and the noise standard deviations taken off each piece's total (soft thresholding).
SHRINK_SIGMAS = 0.5
#: ... and how many noise standard deviations of persons, split as the label marginal, are
#: added to a piece's per-label sums before its label split is read off them (public tables,
#: 5 noise draws: 1.0 cost 0.015 of TSTR AUROC at epsilon 3, 0.25 and 0 tied on both scores).
SPLIT_PRIOR_SIGMAS = 0.25
#: Pair tables keep about sqrt(total / (labels * PAIR_CELL_SIGMAS * sigma)) values per column
#: (``_pair_values``), so that a cell's mean count is about this many noise deviations.
PAIR_CELL_SIGMAS = 1.0


@dataclass(frozen=True)
class _Coarse:
    """A column's coarse domain for pair tables: ``group[fine] -> coarse`` (built from noisy
    anchor counts only)."""

    group: np.ndarray
    size: int


def fit_mst(
    codes: np.ndarray,
    codec: Codec,
    *,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
) -> DPFit:
    """Fit the label-rooted MST model on ``codes`` (one row per person) under
    ``(epsilon, delta)``; ``rng`` draws the DP noise. See the module docstring."""
    n, d = codes.shape
    sizes = codec.sizes
    root = _root_index(codec)
    others = [j for j in range(d) if j != root]
    k_root = sizes[root] if root is not None else 1
    y = codes[:, root] if root is not None else np.zeros(n, dtype=np.int64)
    rounds = max(len(others) - 1, 0)

    n_anchor = max(len(others), 1)
    sigma_anchor, sigma_select, sigma_tree = plan_sigmas(
        epsilon, delta, ((ANCHOR_SHARE, n_anchor), (SELECT_SHARE, rounds), (TREE_SHARE, rounds))
    )
    steps: list[GaussianStep] = []

    # 1. anchors: (label, j) for every other column j (or the label alone if it is all)
    anchors: dict[int, np.ndarray] = {}
    if others:
        for j in others:
            counts = _counts(y, k_root, codes[:, j], sizes[j])
            anchors[j] = counts + rng.normal(0.0, sigma_anchor, counts.shape)
            steps.append(GaussianStep(sigma_anchor, 1.0, 1))
        sums = np.stack([anchors[j].sum(axis=1) for j in others])
        weights = np.asarray([1.0 / sizes[j] for j in others])  # 1 / variance, up to sigma^2
        label_sums = weights @ sums / weights.sum()
    else:
        counts = np.bincount(y, minlength=k_root).astype(np.float64)
        label_sums = counts + rng.normal(0.0, sigma_anchor, counts.shape)
        steps.append(GaussianStep(sigma_anchor, 1.0, 1))
    total = max(float(label_sums.sum()), 1.0)
    label_marginal = project_to_simplex(label_sums, total)

    # post-processing (noisy anchors only): denoised anchors, coarse domains for the pairs
    for j in others:
        column = codec.columns[j]
        denoised = _denoise(column, anchors[j], label_marginal, sigma_anchor)
        # a numeric column under noise as large as its data: a smooth shape (privacy.noisy_counts)
        anchors[j] = smooth_anchor(
            column.spec.is_numeric and column.kind is ValueKind.BINNED,
            column.scale,
            column.n_values,
            anchors[j],
            denoised,
            label_marginal,
            sigma_anchor,
            piece_penalty=SEGMENT_PENALTY,
            rake_rounds=RAKE_ROUNDS,
            prior=_typical_prior(column),
        )
    n_groups = _pair_values(total, k_root, sigma_tree)
    coarse = {j: _coarsen(codec.columns[j], anchors[j].sum(axis=0), n_groups) for j in others}
    coarse_anchor = {j: _merge(anchors[j], coarse[j]) for j in others}
    coarse_codes = {j: coarse[j].group[codes[:, j]] for j in others}

    # 2. selection: Kruskal with one exponential mechanism per round
    eps_select = 2.0 / sigma_select if rounds else 0.0
    pairs = [(a, b) for i, a in enumerate(others) for b in others[i + 1 :]]
    scores = np.empty(len(pairs))
    for p, (a, b) in enumerate(pairs):
        true = _counts3(y, k_root, coarse_codes[a], coarse[a].size, coarse_codes[b], coarse[b].size)
        scores[p] = np.abs(true - _independent(coarse_anchor[a], coarse_anchor[b])).sum()
    component = {j: j for j in others}

    def find(j: int) -> int:
        while component[j] != j:
            component[j] = component[component[j]]
            j = component[j]
        return j

    edges: list[tuple[int, int]] = []
    for _ in range(rounds):
        open_pairs = [p for p, (a, b) in enumerate(pairs) if find(a) != find(b)]
        # Gumbel-max: argmax(eps/2 * score + Gumbel) is a draw from the exponential mechanism
        # exp(eps * score / (2 * sensitivity)) with sensitivity 1.
        logits = 0.5 * eps_select * scores[open_pairs] + rng.gumbel(size=len(open_pairs))
        a, b = pairs[open_pairs[int(np.argmax(logits))]]
        edges.append((a, b))
        component[find(a)] = find(b)
        steps.append(GaussianStep(sigma_select, 1.0, 1))

    # 3. tree: noisy (label, a, b) for every selected pair
    measured: dict[tuple[int, int], np.ndarray] = {}
    for a, b in edges:
        true = _counts3(y, k_root, coarse_codes[a], coarse[a].size, coarse_codes[b], coarse[b].size)
        measured[(a, b)] = true + rng.normal(0.0, sigma_tree, true.shape)
        steps.append(GaussianStep(sigma_tree, 1.0, 1))

    # estimation: orient the tree away from its first column, make tables consistent
    order, parent = _orient(others, edges)
    conditionals: dict[int, np.ndarray] = {}
    for child in order[1:]:
        par = parent[child]
        table = measured[(par, child)] if (par, child) in measured else None
        if table is None:
            table = np.swapaxes(measured[(child, par)], 1, 2)
        conditionals[child] = _consistent(table, coarse_anchor[par], coarse_anchor[child])
    refine = {j: _refinement(anchors[j], coarse[j]) for j in others}

    def sampler(rows: int, srng: np.random.Generator) -> np.ndarray:
        out = np.zeros((rows, d), dtype=np.int64)
        ys = sample_rows(label_marginal[None, :], np.zeros(rows, dtype=np.int64), srng)
        if root is not None:
            out[:, root] = ys
        drawn: dict[int, np.ndarray] = {}
        for j in order:
            if j == order[0]:
                drawn[j] = sample_rows(coarse_anchor[j], ys, srng)
            else:
                par = parent[j]
                table = conditionals[j].reshape(-1, coarse[j].size)
                drawn[j] = sample_rows(table, ys * coarse[par].size + drawn[par], srng)
            out[:, j] = sample_rows(refine[j], ys * coarse[j].size + drawn[j], srng)
        return out

    names = codec.names
    notes = (
        "mst: label-rooted tree-augmented model over noisy marginals "
        f"(root: {names[root] if root is not None else 'none'})",
        f"anchors: {len(others) or 1} Gaussian tables, sigma {sigma_anchor:.4g}",
        f"selection: {rounds} exponential mechanisms, eps {eps_select:.4g} each, recorded as "
        f"GaussianStep({sigma_select:.4g}, 1, 1) (eps-bounded-range => eps^2/8-zCDP)",
        f"tree: {len(edges)} Gaussian tables, sigma {sigma_tree:.4g}; edges: "
        + ", ".join(f"{names[a]}-{names[b]}" for a, b in edges),
        "contribution bound: one row per person (sensitivity 1 per table and per score)",
    )
    return DPFit(steps=tuple(steps), notes=notes, sampler=sampler)


def _typical_prior(column: ColumnCodec) -> Prior | None:
    """A binned column's declared ``typical`` range as a :class:`Prior` in its bin units (on
    its scale); None without one. From the contract alone."""
    typical = column.spec.typical
    if typical is None or column.kind is not ValueKind.BINNED:
        return None
    lo, hi = (float(to_scale(v, column.scale)) for v in (column.lo, column.hi))
    low, high = (
        (float(to_scale(v, column.scale)) - lo) / (hi - lo) * column.n_values for v in typical
    )
    return Prior.from_typical(low, high)


def _root_index(codec: Codec) -> int | None:
    for j, column in enumerate(codec.columns):
        if column.spec.role is Role.LABEL and column.size <= MAX_ROOT_VALUES:
            return j
    return None


def _counts(y: np.ndarray, ky: int, x: np.ndarray, kx: int) -> np.ndarray:
    return np.bincount(y * kx + x, minlength=ky * kx).reshape(ky, kx).astype(np.float64)


def _counts3(y: np.ndarray, ky: int, a: np.ndarray, ka: int, b: np.ndarray, kb: int) -> np.ndarray:
    flat = (y * ka + a) * kb + b
    return np.bincount(flat, minlength=ky * ka * kb).reshape(ky, ka, kb).astype(np.float64)


def _independent(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The (label, a, b) table if a and b were independent given the label."""
    label = np.maximum(left.sum(axis=1), 1e-9)
    return left[:, :, None] * right[:, None, :] / label[:, None, None]


def _pair_values(total: float, k_root: int, sigma_tree: float) -> int:
    """How many values an ordered column keeps in a pair table: about ``sqrt(cells)`` where
    ``cells`` is the most cells per label value whose mean count stays above
    PAIR_CELL_SIGMAS noise standard deviations (``total`` is the noisy number of persons)."""
    if not math.isfinite(sigma_tree):
        return MAX_PAIR_VALUES
    cells = total / (k_root * PAIR_CELL_SIGMAS * sigma_tree)
    return int(min(max(math.floor(math.sqrt(max(cells, 0.0))), 2), MAX_PAIR_VALUES))


def _coarsen(column: ColumnCodec, mass: np.ndarray, n_groups: int) -> _Coarse:
    """Group a column's codes for pair tables, from denoised counts ``mass`` only.

    Ordered columns: contiguous groups of bins of about equal mass (bins without mass join
    their neighbours), at most ``n_groups``; "other" and "missing" stay apart. Categories:
    the ``n_groups - 1`` commonest values with mass keep their own value, the rest share one."""
    size = column.size
    group = np.full(size, -1, dtype=np.int64)
    specials = [c for c in (column.other_code, column.missing_code) if c is not None]
    if column.ordered:
        body = np.maximum(mass[: column.n_values], 0.0)
        total = body.sum()
        n_groups = min(n_groups, column.n_values)
        if total > 0:
            mid = (np.cumsum(body) - body / 2.0) / total
            raw = np.minimum(np.floor(mid * n_groups), n_groups - 1).astype(np.int64)
        else:
            raw = np.arange(column.n_values) * n_groups // column.n_values
        group[: column.n_values] = np.unique(raw, return_inverse=True)[1]
        next_id = int(group[: column.n_values].max()) + 1
        for code in specials:
            group[code] = next_id
            next_id += 1
        return _Coarse(group, next_id)
    values = np.arange(size)
    keep = [v for v in values[np.argsort(-mass, kind="stable")] if mass[v] > 0]
    keep = sorted(keep[: n_groups - 1] if len(keep) >= n_groups else keep)
    for new, v in enumerate(keep):
        group[v] = new
    rest = group < 0
    group[rest] = len(keep)
    return _Coarse(group, len(keep) + int(rest.any()))


def _segments(counts: np.ndarray, penalty: float) -> list[tuple[int, int]]:
    """The piecewise-constant fit of ``counts`` with the least squared error plus ``penalty``
    per piece (dynamic programming, exact): its pieces as ``[start, stop)`` index pairs."""
    k = counts.size
    s1 = np.concatenate([[0.0], np.cumsum(counts)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * counts)])
    best = np.zeros(k + 1)
    prev = np.zeros(k + 1, dtype=np.int64)
    for stop in range(1, k + 1):
        start = np.arange(stop)
        sse = (s2[stop] - s2[start]) - (s1[stop] - s1[start]) ** 2 / (stop - start)
        cost = best[:stop] + sse + penalty
        prev[stop] = int(np.argmin(cost))
        best[stop] = cost[prev[stop]]
    pieces, stop = [], k
    while stop > 0:
        pieces.append((int(prev[stop]), stop))
        stop = int(prev[stop])
    return pieces[::-1]


def _denoise(
    column: ColumnCodec, table: np.ndarray, label_marginal: np.ndarray, sigma: float
) -> np.ndarray:
    """A non-negative (label, value) table from the noisy anchor ``table`` (noise ``sigma``
    per cell), with the label marginal ``label_marginal``. Post-processing only.

    The column's 1-way counts (noise ``s = sigma * sqrt(labels)`` per value) are cut into
    pieces: an ordered column's bins into the least-squares piecewise-constant fit with a
    penalty of SEGMENT_PENALTY * s^2 * ln(bins) per piece; every category, "other" and
    "missing" is its own piece. Each piece's total is soft-thresholded (less SHRINK_SIGMAS
    times its noise standard deviation, at least 0), so that most pieces of noise alone
    (the empty ends of a wide declared domain) keep no mass: a projection of every bin onto
    the non-negative tables leaves noise there more often, and sampling then spreads rows
    over the whole declared domain. Kept mass is spread evenly over a piece's bins; the label
    splits each piece as its noisy per-label sums do, shrunk towards the label marginal by
    SPLIT_PRIOR_SIGMAS noise standard deviations of persons; raking then matches both
    margins. With no piece above the noise: the declared domain evenly, for every label
    value."""
    k_label, size = table.shape
    total = float(label_marginal.sum())
    s = sigma * math.sqrt(k_label)
    mass = table.sum(axis=0)
    pieces: list[tuple[int, int]] = []
    body = column.n_values if column.ordered else 0
    if body:
        penalty = SEGMENT_PENALTY * s * s * math.log(max(body, 2))
        pieces = _segments(mass[:body], penalty)
    pieces += [(v, v + 1) for v in range(body, size)]
    width = np.asarray([b - a for a, b in pieces], dtype=np.float64)
    sums = np.stack([table[:, a:b].sum(axis=1) for a, b in pieces], axis=1)  # (label, piece)
    piece_mass = sums.sum(axis=0)
    # soft thresholding: noise-only pieces (most of them) end at 0, the others lose a little
    piece_mass = np.maximum(piece_mass - SHRINK_SIGMAS * s * np.sqrt(width), 0.0)
    if piece_mass.sum() <= 0:  # nothing above the noise: the declared domain, evenly
        return np.outer(label_marginal, np.full(size, 1.0 / size))
    piece_mass *= max(total, 1.0) / piece_mass.sum()
    prior = label_marginal / max(total, 1e-9)
    shrunk = sums + SPLIT_PRIOR_SIGMAS * s * np.sqrt(width)[None, :] * prior[:, None]
    split = project_to_simplex(shrunk.T, piece_mass).T  # (label, piece), columns sum to mass
    # a floor (0.1% of the independent split) so that raking can always reach both margins
    split += 1e-3 * prior[:, None] * piece_mass[None, :]
    out = np.zeros((k_label, size))
    for p, (a, b) in enumerate(pieces):
        out[:, a:b] = split[:, p : p + 1] / (b - a)
    # rows to the label marginal, columns to the 1-way counts
    want = np.repeat(piece_mass / width, width.astype(np.int64))
    return rake(out, label_marginal, want, RAKE_ROUNDS)


def _merge(table: np.ndarray, coarse: _Coarse) -> np.ndarray:
    """Sum a (label, fine) table into (label, coarse)."""
    onehot = (coarse.group[:, None] == np.arange(coarse.size)[None, :]).astype(np.float64)
    return np.asarray(table @ onehot)


def _refinement(anchor: np.ndarray, coarse: _Coarse) -> np.ndarray:
    """Rows ``label * coarse.size + g``: how a coarse value ``g`` splits into fine codes,
    from the anchor's (label, fine) counts; falls back to the label-free split, then to a
    uniform split over the group's members."""
    k_label, k_fine = anchor.shape
    member = coarse.group[None, :] == np.arange(coarse.size)[:, None]  # (coarse, fine)
    overall = anchor.sum(axis=0)
    out = np.empty((k_label, coarse.size, k_fine))
    for y in range(k_label):
        for g in range(coarse.size):
            for weights in (anchor[y], overall, np.ones(k_fine)):
                row = np.where(member[g], weights, 0.0)
                if row.sum() > 0:
                    break
            out[y, g] = row
    return out.reshape(k_label * coarse.size, k_fine)


def _consistent(table: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """A non-negative (label, a, b) table close to the noisy ``table`` whose (label, a) and
    (label, b) margins match the anchors ``left`` and ``right``: least-squares projection per
    label value onto the tables with the anchors' total, then raking to both margins."""
    k_label, ka, kb = table.shape
    totals = left.sum(axis=1)
    est = project_to_simplex(table.reshape(k_label, ka * kb), totals).reshape(table.shape)
    # a tiny floor lets raking put mass where the projection left a whole row or column at 0
    est = est + 1e-9 * max(float(totals.sum()), 1.0) / (ka * kb) + 1e-12
    for _ in range(RAKE_ROUNDS):
        rows = est.sum(axis=2)
        est *= np.where(rows > 0, left / np.where(rows > 0, rows, 1.0), 0.0)[:, :, None]
        cols = est.sum(axis=1)
        est *= np.where(cols > 0, right / np.where(cols > 0, cols, 1.0), 0.0)[:, None, :]
    return est


def _orient(nodes: list[int], edges: list[tuple[int, int]]) -> tuple[list[int], dict[int, int]]:
    """Breadth-first order of the tree from its first node, and each node's parent."""
    if not nodes:
        return [], {}
    neighbours: dict[int, list[int]] = {j: [] for j in nodes}
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    order, parent = [nodes[0]], {}
    queue = deque([nodes[0]])
    seen = {nodes[0]}
    while queue:
        j = queue.popleft()
        for k in neighbours[j]:
            if k not in seen:
                seen.add(k)
                parent[k] = j
                order.append(k)
                queue.append(k)
    return order, parent
