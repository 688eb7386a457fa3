"""One config section per hypergradient method, each holding only the keys it reads.

A recipe's ``hypergrad`` field names the methods it supports, as one section or a union of
them told apart by ``method``::

    class Config(Section):
        hypergrad: Backprop = Unrolled(steps=10)     # unrolled | checkpointed | truncated

so ``method: implicit`` in a recipe that cannot honour it is a config error (exit 2) naming
``hypergrad.method`` and the methods it accepts, and ``solver:`` under ``method: unrolled`` is
an unknown key rather than a setting silently ignored. :func:`bilevel.hypergrad.from_config`
turns a section into the engine call.

Step counts: ``steps`` is the number T of inner steps one hyper-step runs; series lengths are
``terms`` (one-pass: i terms of the Neumann series, as the engine's ``terms=``) or, for
``implicit``, ``iters`` (Neumann: terms after the first, the seed's K, so K + 1 terms;
CG / MINRES: iterations).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from bilevel.run.schema import Section

Steps = Annotated[int, Field(gt=0, le=1_000_000, description="inner steps per hyper-step (T)")]


class Unrolled(Section):
    """Back-propagation through all ``steps`` inner steps (:func:`bilevel.hypergrad.unrolled`)."""

    method: Literal["unrolled"] = "unrolled"
    steps: Steps = 1


class Checkpointed(Section):
    """As ``unrolled``, keeping only segment boundaries and recomputing in the backward pass
    (memory ~ sqrt(steps) for one extra forward)."""

    method: Literal["checkpointed"] = "checkpointed"
    steps: Steps = 1
    segment: int | None = Field(None, gt=0, description="steps per segment (None: the engine's rule)")


class Truncated(Section):
    """Back-propagation through the last ``truncate`` of ``steps`` inner steps only."""

    method: Literal["truncated"] = "truncated"
    steps: Steps = 1
    truncate: int = Field(gt=0, description="steps that carry gradient (K ≤ steps)")

    @model_validator(mode="after")
    def _fits(self) -> Truncated:
        if self.truncate > self.steps:
            raise ValueError(f"truncate ({self.truncate}) must be at most steps ({self.steps})")
        return self


class Forward(Section):
    """Forward-mode (tangent) propagation through ``steps`` inner steps: memory flat in T."""

    method: Literal["forward"] = "forward"
    steps: Steps = 1


class Implicit(Section):
    """Implicit differentiation at the current weights (:func:`bilevel.hypergrad.implicit`)."""

    method: Literal["implicit"] = "implicit"
    solver: Literal["neumann", "cg", "minres", "identity", "exact"] = "neumann"
    iters: int = Field(5, ge=0, le=100_000,
                       description="neumann: terms after the first (K, so K + 1 terms); "
                                   "cg / minres: iterations")
    alpha: float | None = Field(None, gt=0.0, description="Neumann step size (None: the "
                                "recipe's, usually its inner lr)")


class OnePass(Section):
    """Clarke et al.'s one-pass hypergradient of the last of every ``steps`` weight steps."""

    method: Literal["one_pass"] = "one_pass"
    steps: Steps = 10
    terms: int = Field(5, gt=0, le=100_000, description="Neumann terms i")


class Greedy(Section):
    """Baydin et al.'s one-step (greedy) hypergradient after ``steps`` inner steps."""

    method: Literal["greedy"] = "greedy"
    steps: Steps = 1


Method = Unrolled | Checkpointed | Truncated | Forward | Implicit | OnePass | Greedy

# Back-propagation through training, the union the unrolling recipes accept.
Backprop = Annotated[Unrolled | Checkpointed | Truncated, Field(discriminator="method")]
# Any method: for code that handles them all (bilevel.hypergrad.from_config).
HypergradConfig = Annotated[Method, Field(discriminator="method")]
