"""Kernel ridge regression (RBF) in numpy: the paper's PRE baseline (del Rey et al. 2023).

A small dense implementation for benchmarks: standardised inputs (constant
columns dropped), a Gaussian kernel, ``(K + alpha I)^-1 y`` by Cholesky, and
``alpha`` and ``gamma`` picked by K-fold cross-validation on the training rows.
"""

from __future__ import annotations

import numpy as np

from profiler.errors import NotFittedError


class KernelRidge:
    """RBF kernel ridge regression on a log target.

    Args:
        alphas: Ridge penalties tried.
        gammas: Kernel widths tried, in units of 1 / (number of used features).
        cv_folds: Folds of the selection.
        seed: Fold shuffle seed.

    Attributes:
        alpha_: Chosen penalty.
        gamma_: Chosen kernel width.
        used_: Indices of the non-constant input columns.

    """

    def __init__(
        self,
        *,
        alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
        gammas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0),
        cv_folds: int = 5,
        seed: int = 0,
    ) -> None:
        self.alphas = alphas
        self.gammas = gammas
        self.cv_folds = cv_folds
        self.seed = seed

    @staticmethod
    def _kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.asarray(np.exp(-gamma * np.maximum(d2, 0.0)), dtype=float)

    def _solve(self, x: np.ndarray, y: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
        k = self._kernel(x, x, gamma) + alpha * np.eye(len(x))
        return np.linalg.solve(k, y)

    def fit(self, x: np.ndarray, y: np.ndarray) -> KernelRidge:
        """Fit on inputs ``x`` (rows x features) and positive targets ``y``."""
        x = np.asarray(x, dtype=float)
        x = np.where(np.isfinite(x), x, np.nan)
        known = np.isfinite(x)
        cnt = np.maximum(known.sum(0), 1)
        filled = np.where(known, x, 0.0)
        self.mean_ = filled.sum(0) / cnt
        self.std_ = np.sqrt((np.where(known, x - self.mean_, 0.0) ** 2).sum(0) / cnt)
        self.std_[known.sum(0) == 0] = 0.0  # unknown columns carry no information
        self.used_ = np.where(np.isfinite(self.std_) & (self.std_ > 0))[0]
        z = self._z(x)
        ly = np.log(np.asarray(y, dtype=float))
        self.ymean_ = float(ly.mean())
        ly = ly - self.ymean_
        perm = np.random.default_rng(self.seed).permutation(len(z))
        parts = np.array_split(perm, self.cv_folds)
        best = None
        for a in self.alphas:
            for g0 in self.gammas:
                g = g0 / max(len(self.used_), 1)
                err = 0.0
                for i, va in enumerate(parts):
                    tr = np.concatenate(parts[:i] + parts[i + 1 :])
                    w = self._solve(z[tr], ly[tr], a, g)
                    p = self._kernel(z[va], z[tr], g) @ w
                    err += float(np.abs(np.exp(p - ly[va]) - 1).sum())
                if best is None or err < best[0]:
                    best = (err, a, g)
        assert best is not None
        _, self.alpha_, self.gamma_ = best
        self.x_ = z
        self.w_ = self._solve(z, ly, self.alpha_, self.gamma_)
        return self

    def _z(self, x: np.ndarray) -> np.ndarray:
        z = (x[:, self.used_] - self.mean_[self.used_]) / self.std_[self.used_]
        return np.asarray(np.nan_to_num(z), dtype=float)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted targets for inputs ``x``."""
        if not hasattr(self, "w_"):
            raise NotFittedError("This KernelRidge instance is not fitted yet; call fit(x, y)")
        z = self._z(np.asarray(x, dtype=float))
        return np.asarray(
            np.exp(self._kernel(z, self.x_, self.gamma_) @ self.w_ + self.ymean_), dtype=float
        )
