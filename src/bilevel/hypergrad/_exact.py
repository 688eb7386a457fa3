"""Exact, invertible fixed-point arithmetic for :func:`bilevel.hypergrad.reversible`.

Numbers are int64 tensors ``X`` standing for ``X * 2**-bits``. Adding a quantised float is
undone by subtracting the same quantised float. Multiplying by a momentum ``γ ∈ [1/16, 1]``
destroys information; it is made exact as in Maclaurin, Duvenaud & Adams (ICML 2015, §3.1)
by saving exactly the destroyed information in an :class:`InfoBuffer`:

* ``γ`` is the rational ``n / 2**31`` (``n = round(γ 2**31)``, resolution 4.7e-10);
* ``y = floor(X n / 2**31)`` is the product rounded down (error below one unit);
* the ``c`` integers ``X`` with the same ``y`` (``c = 1`` or ``2`` for ``γ ≥ 1/2``, at most
  16) are told apart by ``i = X - ceil(y 2**31 / n)``, pushed into the buffer in base ``c``.

The buffer is a vectorised streaming rANS coder with a uniform alphabet (one coder state
per weight): pushing ``i`` in base ``c`` is ``s ← s c + i``; the state lives in
``[L, 2**32 L)`` and spills its low 32 bits onto a stack of int32 words when it would leave
that range. With ``L`` a multiple of every base (``lcm(1..16)``) push and pop are exact
inverses on every state (rANS "b-uniqueness"), so memory is the information actually
destroyed by the rounded product, ``E[log2 c]`` bits per weight per step (``2(1 - γ)`` for
``γ ≥ 1/2``: 0.2 at ``γ = 0.9``; 4 at ``γ = 1/16``), plus one int64 coder state per weight.
(Maclaurin et al. pack buffer bits into the product's low digits instead, reaching
``log2(1/γ)``, 0.15 bits, at the price of a product wrong by up to ``γ 2**16`` units.)
"""

from __future__ import annotations

from array import array

import torch

from bilevel.errors import HypergradError

FRAC_BITS = 31  # γ = n / 2**31
MIN_MOMENTUM = 1.0 / 16.0  # base c <= 16 keeps the coder's numbers inside int64
_WORD_BITS = 32
_WORD = 1 << _WORD_BITS
_LOW = 720720 * 2**7  # lcm(1..16) * 2**7 ≈ 2**26.5: every base divides it; 16 * L * 2**32 < 2**63
MAX_ABS_BITS = 58  # |X| < 2**58, so X / γ (γ >= 1/16) and sums stay inside int64


def to_fixed(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``round(x 2**bits)`` as int64 (exact: scaling a float by a power of two is exact)."""
    return torch.round(x.double() * 2.0**bits).to(torch.int64)


def to_float(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The float64 value of a fixed-point tensor (rounded where ``|x| > 2**53``)."""
    return x.double() * 2.0**-bits


def in_range(x: torch.Tensor, bits: int) -> torch.Tensor:
    """0-d bool tensor: ``x`` is finite and fits the fixed-point range (no host sync)."""
    limit = 2.0 ** (MAX_ABS_BITS - bits)
    return (x.double().abs() < limit).all() if x.numel() else torch.ones((), dtype=torch.bool)


def numerator(momentum: torch.Tensor) -> torch.Tensor:
    """``n = round(γ 2**31)`` as int64: the rational the exact multiply uses for ``γ``."""
    return torch.round(momentum.double() * 2.0**FRAC_BITS).to(torch.int64)


def quantised(momentum: torch.Tensor) -> torch.Tensor:
    """The momentum the exact multiply really applies, ``n / 2**31`` (float64)."""
    return numerator(momentum).double() * 2.0**-FRAC_BITS


def momentum_ok(momentum: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: every momentum lies in ``[1/16, 1]``."""
    m = momentum.double()
    return ((m >= MIN_MOMENTUM) & (m <= 1.0)).all()


def _ceil_scaled(y: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``ceil(y 2**31 / n)`` exactly, without forming ``y 2**31`` (it would overflow)."""
    a = torch.div(y, n, rounding_mode="floor")
    b = y - a * n  # in [0, n)
    return a * (1 << FRAC_BITS) + torch.div(b * (1 << FRAC_BITS) + n - 1, n, rounding_mode="floor")


class InfoBuffer:
    """The bits that exact momentum multiplies destroy: one rANS state per weight and a
    stack of spilled 32-bit words. ``push``/``pop`` must be called in exactly reverse order.

    The words of all pushes share one growing int32 tensor (doubling capacity) and each push
    records only where its words start, so a step costs its data plus 8 bytes, not a tensor
    object (~1 KB) per step.
    """

    def __init__(self, numel: int, device: torch.device) -> None:
        self.state = torch.full((numel,), _LOW, dtype=torch.int64, device=device)
        self._store = torch.empty(max(1024, numel), dtype=torch.int32, device=device)
        self._top = 0
        self._starts = array("q")  # where each push's words begin in _store

    def push(self, i: torch.Tensor, c: torch.Tensor) -> None:
        """Store ``i`` (``0 <= i < c``, ``1 <= c <= 16``), elementwise."""
        spill = self.state >= (_LOW // c) * _WORD
        low = ((self.state[spill] & (_WORD - 1)) - (1 << 31)).to(torch.int32)
        end = self._top + low.numel()
        if end > self._store.numel():
            grown = torch.empty(max(end, 2 * self._store.numel()), dtype=torch.int32, device=low.device)
            grown[:self._top] = self._store[:self._top]
            self._store = grown
        self._store[self._top:end] = low
        self._starts.append(self._top)
        self._top = end
        self.state = torch.where(spill, self.state >> _WORD_BITS, self.state) * c + i

    def pop(self, c: torch.Tensor) -> torch.Tensor:
        """Take back the ``i`` stored last in base ``c``."""
        i = torch.remainder(self.state, c)
        s = torch.div(self.state, c, rounding_mode="floor")
        refill = s < _LOW
        start = self._starts.pop() if self._starts else -1
        if start < 0 or self._top - start != int(refill.sum()):
            raise HypergradError(
                "reversible: the information buffer is out of step, so the reverse pass did not "
                "retrace the forward one: loss_fn must be deterministic in (w, hparams, t); take "
                "minibatches and random numbers from t (a generator seeded by t).")
        words = self._store[start:self._top]
        self._top = start
        s = s.clone()
        s[refill] = (s[refill] << _WORD_BITS) | (words.to(torch.int64) + (1 << 31))
        self.state = s
        return i

    @property
    def nbytes(self) -> int:
        """Bytes held: the coder states, the word store (its capacity) and the push starts."""
        return self.state.numel() * 8 + self._store.numel() * 4 + 8 * len(self._starts)

    @property
    def spilled_bytes(self) -> int:
        """Bytes of spilled words in use (the information itself, beyond the states)."""
        return 4 * self._top

    @property
    def empty(self) -> bool:
        """Back at the start: nothing stored (every state at its initial value)."""
        return not self._starts and self._top == 0 and bool((self.state == _LOW).all())


def mul(x: torch.Tensor, n: torch.Tensor, buffer: InfoBuffer) -> torch.Tensor:
    """``floor(x n / 2**31)``, pushing what tells ``x`` apart from the other preimages."""
    q = x >> FRAC_BITS
    r = x & ((1 << FRAC_BITS) - 1)
    y = q * n + ((r * n) >> FRAC_BITS)
    lo = _ceil_scaled(y, n)
    buffer.push(x - lo, _ceil_scaled(y + 1, n) - lo)
    return y


def unmul(y: torch.Tensor, n: torch.Tensor, buffer: InfoBuffer) -> torch.Tensor:
    """The exact inverse of :func:`mul`: the ``x`` it was given."""
    lo = _ceil_scaled(y, n)
    return lo + buffer.pop(_ceil_scaled(y + 1, n) - lo)
