"""Exact t-SNE (van der Maaten & Hinton, JMLR 2008) in numpy, for a few hundred points.

Why here: scikit-learn is not a dependency, and the retrieval report only needs a 2-D
picture of a few hundred hash codes (seed 001 Figure 6). O(n^2) memory and time per
iteration: fine for n <= ~1500.

Input is a distance matrix, so Hamming distances between binary codes can be used
directly (squared, as t-SNE's Gaussian kernel expects squared distances).
"""

from __future__ import annotations

import numpy as np


def _conditional_p(d2: np.ndarray, perplexity: float, tol: float = 1e-5) -> np.ndarray:
    """Row-wise binary search of the Gaussian precision giving the target perplexity.

    d2: (n, n) squared distances. Returns P(j | i) (rows sum to 1, zero diagonal).
    """
    n = d2.shape[0]
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        row = np.delete(d2[i], i)
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(100):
            w = np.exp(-(row - row.min()) * beta)
            s = w.sum()
            h = np.log(s) + beta * np.sum((row - row.min()) * w) / s  # entropy (nats)
            if abs(h - target) < tol:
                break
            if h > target:  # too flat: sharpen
                lo = beta
                beta = beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi = beta
                beta = (beta + lo) / 2
        p[i, np.arange(n) != i] = w / s
    return p


def tsne(
    distances: np.ndarray,
    *,
    perplexity: float = 30.0,
    iterations: int = 750,
    learning_rate: float | None = None,
    exaggeration: float = 12.0,
    exaggeration_iterations: int = 250,
    seed: int = 0,
) -> np.ndarray:
    """(n, n) symmetric distances -> (n, 2) embedding (plain gradient descent with
    momentum 0.5 -> 0.8 and the usual gains, as in the reference implementation).

    learning_rate None: max(n / exaggeration / 4, 50) (Belkina et al. 2019, also
    scikit-learn's default); a fixed 200 ejects single points to thousands of units
    on a hundred points, which breaks the picture."""
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError("distances must be a square matrix")
    perplexity = min(perplexity, max((n - 1) / 3.0, 1.0))
    p = _conditional_p(d**2, perplexity)
    p = np.maximum((p + p.T) / (2.0 * n), 1e-12)
    if learning_rate is None:
        learning_rate = max(n / exaggeration / 4.0, 50.0)
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, 2)) * 1e-4
    velocity = np.zeros_like(y)
    gains = np.ones_like(y)
    for it in range(iterations):
        sum_y = np.sum(y * y, axis=1)
        num = 1.0 / (1.0 + sum_y[:, None] + sum_y[None, :] - 2.0 * y @ y.T)
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        scale = exaggeration if it < exaggeration_iterations else 1.0
        pq = (scale * p - q) * num
        grad = 4.0 * (np.diag(pq.sum(axis=1)) - pq) @ y
        momentum = 0.5 if it < exaggeration_iterations else 0.8
        same_sign = np.sign(grad) == np.sign(velocity)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - learning_rate * gains * grad
        y = y + velocity
        y = y - y.mean(axis=0)
    return y


def kl_divergence(distances: np.ndarray, y: np.ndarray, perplexity: float) -> float:
    """KL(P || Q) of an embedding (for tests: a good embedding has a low value)."""
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    p = _conditional_p(d**2, min(perplexity, max((n - 1) / 3.0, 1.0)))
    p = np.maximum((p + p.T) / (2.0 * n), 1e-12)
    sum_y = np.sum(y * y, axis=1)
    num = 1.0 / (1.0 + sum_y[:, None] + sum_y[None, :] - 2.0 * y @ y.T)
    np.fill_diagonal(num, 0.0)
    q = np.maximum(num / num.sum(), 1e-12)
    mask = ~np.eye(n, dtype=bool)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
