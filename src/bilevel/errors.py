"""The exceptions bilevel raises, each with the exit code the CLI maps it to.

Every message states what was expected, what was received and how to fix it.
The leaf packages (``data``, ``models``) define their own exceptions with the same
``exit_code`` attribute, so the CLI needs no import of them to map codes.
"""

from __future__ import annotations


class BilevelError(Exception):
    """Base class of bilevel's errors."""

    exit_code: int = 1


class ConfigError(BilevelError, ValueError):
    """A config file, a ``--set`` override or a keyword argument is invalid."""

    exit_code = 2


class CheckpointError(BilevelError):
    """No valid checkpoint could be read (missing, truncated, tampered)."""

    exit_code = 4


class TreeStructureError(BilevelError, ValueError):
    """Two trees that must have the same structure do not."""


class HypergradError(BilevelError, RuntimeError):
    """A hypergradient could not be computed; the message says why and what to try."""


class NonFiniteError(HypergradError):
    """A loss, a state or a hypergradient became NaN or infinite.

    Attributes:
        step: the inner step at which it was first seen (``None`` when not tied to a step).
        what: ``"state"``, ``"outer loss"`` or ``"hypergradient"``.
    """

    def __init__(self, message: str, *, step: int | None = None, what: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.what = what


class NeumannDivergenceError(HypergradError):
    """The Neumann series for an inverse-Jacobian product grew instead of shrinking."""


class HypergradWarning(UserWarning):
    """A hypergradient was computed but may be inaccurate: an implicit solver had not
    converged (the last Neumann term or CG/MINRES residual is not small relative to the
    first), or the state is not a fixed point of the step map. The message says by how much
    and what to change. Silence it deliberately with
    ``warnings.filterwarnings("ignore", category=HypergradWarning)`` where a truncated solve
    is intended (e.g. Lorraine et al.'s few-term Neumann approximation)."""


class SweepStoppedError(BilevelError):
    """A sweep stopped because a trial could not start for a reason every trial shares
    (missing data, an invalid config): running the others would only repeat it.

    ``exit_code`` is the cause's own (2 config, 3 data), so ``bilevel sweep`` exits as
    ``bilevel run`` would have.
    """

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


SHARED_CAUSE_CODES = (2, 3)  # ConfigError, the data package's errors


def shared_cause_code(exc: BaseException) -> int:
    """The exit code of ``exc`` if it is a cause every trial of a sweep shares, else 0."""
    code = getattr(exc, "exit_code", 0)
    return code if code in SHARED_CAUSE_CODES else 0
