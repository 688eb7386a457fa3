"""The runnable examples in the optim docstrings stay runnable."""

from __future__ import annotations

import doctest

import pytest

import bilevel.optim._alig_optimizer
from bilevel.optim import adam, alig, sgd


@pytest.mark.parametrize("module", [sgd, adam, alig, bilevel.optim._alig_optimizer],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
