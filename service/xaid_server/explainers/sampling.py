"""Coalition sampling and the surrogate regressions of LIME and KernelSHAP, in numpy only.

A coalition is a boolean row over the M segments (True: the segment keeps its input values).
LIME fits a weighted ridge regression on random coalitions (Ribeiro 2016, as the `lime`
package does); KernelSHAP fits a weighted least-squares regression with the Shapley kernel under
the constraint that the weights add up to F(x) - base value (Lundberg 2017), so efficiency holds
exactly rather than approximately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

#: Coalitions are enumerated (exact Shapley values) when the sample budget covers all of them.
MAX_ENUMERATED_SEGMENTS = 16


@dataclass(frozen=True)
class Surrogate:
    """A linear model over coalitions: one coefficient per segment, its intercept and fit."""

    coefficients: np.ndarray  # float64 [M]
    intercept: float
    score: float  # weighted R^2 on the samples it was fitted to


def lime_masks(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """n coalitions, each segment on with probability 1/2; the first keeps every segment."""
    masks = rng.integers(0, 2, size=(n, m)).astype(bool)
    masks[0] = True
    return masks


def cosine_distance_to_ones(masks: np.ndarray) -> np.ndarray:
    """1 - cos(z, 1) per row; an empty coalition is at distance 1, as scikit-learn has it."""
    on = masks.sum(axis=1).astype(np.float64)
    distances: np.ndarray = 1.0 - np.sqrt(on / masks.shape[1])
    return distances


def lime_kernel(distances: np.ndarray, width: float) -> np.ndarray:
    """LIME's exponential kernel sqrt(exp(-d^2 / w^2))."""
    return np.asarray(np.sqrt(np.exp(-(distances**2) / width**2)), dtype=np.float64)


def weighted_ridge(
    masks: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float
) -> Surrogate:
    """Ridge with an unpenalised intercept and sample weights (scikit-learn's `Ridge`).

    Centre features and targets on their weighted means, solve
    (Zc' W Zc + alpha I) c = Zc' W yc, and report the weighted R^2 as `Ridge.score` does.
    """
    z = masks.astype(np.float64)
    total = float(weights.sum())
    z_mean = weights @ z / total
    y_mean = float(weights @ y) / total
    zc = z - z_mean
    gram = zc.T @ (zc * weights[:, None])
    rhs = zc.T @ ((y - y_mean) * weights)
    coefficients = np.linalg.lstsq(gram + alpha * np.eye(z.shape[1]), rhs, rcond=None)[0]
    intercept = y_mean - float(z_mean @ coefficients)
    return Surrogate(coefficients, intercept, weighted_r2(z, y, weights, coefficients, intercept))


def weighted_r2(
    z: np.ndarray, y: np.ndarray, weights: np.ndarray, coefficients: np.ndarray, intercept: float
) -> float:
    residual = y - (z @ coefficients + intercept)
    spread = y - float(weights @ y) / float(weights.sum())
    total = float(weights @ spread**2)
    return 1.0 - float(weights @ residual**2) / total if total > 0 else 0.0


def shapley_kernel(m: int, sizes: np.ndarray) -> np.ndarray:
    """(M - 1) / (C(M, s) s (M - s)): the weight of one coalition of size s (0 < s < M)."""
    binomial = np.array([math.comb(m, int(s)) for s in sizes], dtype=np.float64)
    weights: np.ndarray = (m - 1) / (binomial * sizes * (m - sizes))
    return weights


def shapley_masks(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions other than the empty and the full one, and their regression weights.

    When n covers all 2^M - 2 of them they are enumerated with their exact kernel weights, and
    the regression gives the exact Shapley values. Otherwise sizes are drawn with probability
    proportional to the kernel's total weight per size, members uniformly, each coalition
    followed by its complement (same weight, lower variance), every sample with weight 1.
    """
    if m <= MAX_ENUMERATED_SEGMENTS and 2**m - 2 <= n:
        masks = np.zeros((2**m - 2, m), dtype=bool)
        row = 0
        for size in range(1, m):
            for members in combinations(range(m), size):
                masks[row, list(members)] = True
                row += 1
        return masks, shapley_kernel(m, masks.sum(axis=1))
    sizes = np.arange(1, m)
    per_size = (m - 1) / (sizes * (m - sizes))
    pairs = (n + 1) // 2
    drawn = rng.choice(sizes, size=pairs, p=per_size / per_size.sum())
    order = rng.random((pairs, m)).argsort(axis=1)
    masks = order < drawn[:, None]
    masks = np.stack([masks, ~masks], axis=1).reshape(-1, m)[:n]
    return masks, np.ones(n, dtype=np.float64)


def constrained_shapley(
    masks: np.ndarray, y: np.ndarray, weights: np.ndarray, base: float, full: float
) -> np.ndarray:
    """Weighted least squares of y - base on the coalitions with sum(phi) = full - base.

    The last coefficient is eliminated (phi_M = delta - sum of the others), so the constraint
    holds to rounding whatever the samples.
    """
    delta = full - base
    m = masks.shape[1]
    if m == 1:
        return np.array([delta])
    z = masks.astype(np.float64)
    last = z[:, -1]
    design = z[:, :-1] - last[:, None]
    target = y - base - last * delta
    root = np.sqrt(weights)
    head = np.linalg.lstsq(design * root[:, None], target * root, rcond=None)[0]
    return np.append(head, delta - head.sum())
