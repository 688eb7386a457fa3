"""Small real problems with known hypergradients, shared by the engine tests.

Ridge regression on scikit-learn's diabetes data (442 patients, 10 features, bundled
with scikit-learn): inner loss ``L_T(w, λ) = ‖Xw − y‖²/2n + e^λ‖w‖²/2``, gradient-descent
steps ``w ← w − η∇L_T``, outer loss the mean squared error on held-out patients.
Everything linear, so every quantity has a closed form.
"""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_diabetes
from torch.func import grad


class Ridge:
    def __init__(self, *, lr: float = 0.1, dtype: torch.dtype = torch.float64) -> None:
        x, y = load_diabetes(return_X_y=True)
        x = torch.tensor(x, dtype=dtype)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(y, dtype=dtype)
        y = (y - y.mean()) / y.std()
        self.xt, self.yt = x[:300], y[:300]
        self.xv, self.yv = x[300:], y[300:]
        self.lr = lr
        self.d = x.shape[1]

    # --- the contract -----------------------------------------------------------
    def train_loss(self, w: torch.Tensor, h: dict) -> torch.Tensor:
        r = self.xt @ w - self.yt
        return 0.5 * (r * r).mean() + 0.5 * torch.exp(h["log_reg"]) * (w * w).sum()

    def step(self, state: dict, h: dict, t: int) -> dict:
        g = grad(self.train_loss)(state["w"], h)
        return {"w": state["w"] - self.lr * g}

    def outer_loss(self, state: dict, h: dict) -> torch.Tensor:
        r = self.xv @ state["w"] - self.yv
        return 0.5 * (r * r).mean()

    def state0(self) -> dict:
        return {"w": torch.zeros(self.d, dtype=self.xt.dtype)}

    def hparams(self, value: float = -2.0) -> dict:
        return {"log_reg": torch.tensor(value, dtype=self.xt.dtype, requires_grad=True)}

    # --- closed forms -------------------------------------------------------------
    def a_b(self, log_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.xt.shape[0]
        a = self.xt.T @ self.xt / n + math.exp(log_reg) * torch.eye(self.d, dtype=self.xt.dtype)
        return a, self.xt.T @ self.yt / n

    def unrolled_exact(self, log_reg: float, steps: int, carried: int | None = None) -> float:
        """dL_V/dλ by the forward recursion dw_{t+1} = (I − ηA)dw_t − η e^λ w_t, with the
        sensitivity started at zero ``carried`` steps before the end (truncation)."""
        a, b = self.a_b(log_reg)
        lam = math.exp(log_reg)
        w = torch.zeros(self.d, dtype=a.dtype)
        dw = torch.zeros(self.d, dtype=a.dtype)
        first = steps - (carried or steps)
        for t in range(steps):
            if t == first:
                dw = torch.zeros_like(dw)
            dw, w = (dw - self.lr * (a @ dw)) - self.lr * lam * w, w - self.lr * (a @ w - b)
        r = self.xv @ w - self.yv
        gv = self.xv.T @ r / self.xv.shape[0]
        return float(gv @ dw)

    def solution(self, log_reg: float) -> torch.Tensor:
        a, b = self.a_b(log_reg)
        return torch.linalg.solve(a, b)

    def implicit_exact(self, log_reg: float) -> float:
        """dL_V/dλ at w* = A⁻¹b: dw*/dλ = −A⁻¹ e^λ w*."""
        a, _ = self.a_b(log_reg)
        w = self.solution(log_reg)
        lam = math.exp(log_reg)
        dw = -torch.linalg.solve(a, lam * w)
        gv = self.xv.T @ (self.xv @ w - self.yv) / self.xv.shape[0]
        return float(gv @ dw)

    def outer_after(self, log_reg: float, steps: int) -> float:
        """L_V after ``steps`` steps, for finite differences."""
        h = {"log_reg": torch.tensor(log_reg, dtype=self.xt.dtype)}
        s = self.state0()
        for t in range(steps):
            s = self.step(s, h, t)
        return float(self.outer_loss(s, h))
