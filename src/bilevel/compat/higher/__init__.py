"""``import bilevel.compat.higher as higher``: the API of facebookresearch/higher on torch.func.

Everything code written for ``higher`` uses is here under the same names:
:func:`innerloop_ctx`, :func:`monkeypatch`, :func:`get_diff_optim`, :func:`create_diff_optim`,
:func:`register_optim`, and the submodules :mod:`~bilevel.compat.higher.optim` (the
differentiable optimisers), :mod:`~bilevel.compat.higher.patch` and
:mod:`~bilevel.compat.higher.utils`. Differences from ``higher``:

* no class is created or patched: the module runs through ``torch.func.functional_call``;
* the optimisers follow torch 2.13's ``torch.optim`` updates (``higher``'s AdamW no longer
  does), and their square roots have finite derivatives at 0 instead of masking hooks;
* memory: ``track_higher_grads=False`` keeps one copy of the fast weights, and leaving
  ``innerloop_ctx`` drops the intermediate steps (``parameters(time=0)`` and the latest stay);
* ``override`` keys must be settings of the optimiser (a typo is an error, not ignored).

See ``docs/migrating.md`` for side-by-side examples.
"""

from __future__ import annotations

from bilevel.compat.higher import optim, patch, utils
from bilevel.compat.higher.context import innerloop_ctx
from bilevel.compat.higher.optim import create_diff_optim, get_diff_optim, register_optim
from bilevel.compat.higher.patch import monkeypatch

__all__ = [
    "create_diff_optim",
    "get_diff_optim",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]
