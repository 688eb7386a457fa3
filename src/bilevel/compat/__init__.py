"""Drop-ins for the APIs users already have, built on bilevel's pieces.

* :mod:`bilevel.compat.higher`: the API of ``facebookresearch/higher`` (``innerloop_ctx``,
  ``monkeypatch``, the differentiable optimisers) on ``torch.func.functional_call``, with no
  monkey-patching of module classes. Replace ``import higher`` by
  ``import bilevel.compat.higher as higher``; see ``docs/migrating.md``.

Nothing here is imported by ``import bilevel``; import the drop-in you need.
"""
