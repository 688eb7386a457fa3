"""Small tree utilities over dicts, lists, tuples and NamedTuples of tensors.

A *tree* is a tensor (a leaf), ``None`` (an empty node), or a ``dict`` / ``list`` /
``tuple`` / ``NamedTuple`` of trees. Dict order is the order of insertion, so two dicts
with the same keys in a different order are different structures; keep keys in one order
(``model.named_parameters()`` does).

torch's own pytree lives in a private module; this one is public, tiny, and gives error
messages that name the path where two trees differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bilevel.errors import TreeStructureError

Tree = Any  # Tensor | None | dict[str, Tree] | list[Tree] | tuple[Tree, ...] | NamedTuple


@dataclass(frozen=True)
class TreeDef:
    """The structure of a tree without its leaves."""

    kind: str  # "leaf", "none", "dict", "list", "tuple", "namedtuple"
    meta: Any = None  # dict keys or the NamedTuple type
    children: tuple[TreeDef, ...] = ()

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)


def _node(tree: Tree) -> tuple[str, Any, list[Tree], list[str]]:
    """Kind, metadata, children and their path labels of one node."""
    if tree is None:
        return "none", None, [], []
    if isinstance(tree, dict):
        keys = tuple(tree.keys())
        return "dict", keys, [tree[k] for k in keys], [str(k) for k in keys]
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return "namedtuple", type(tree), list(tree), list(tree._fields)
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return kind, None, list(tree), [str(i) for i in range(len(tree))]
    return "leaf", None, [], []


def tree_flatten(tree: Tree) -> tuple[list[Any], TreeDef]:
    """Leaves in depth-first order and the structure to rebuild the tree."""
    leaves: list[Any] = []
    return leaves, _walk(tree, leaves)


# The walkers are module-level functions with explicit arguments, not nested closures:
# a closure that calls itself refers to its own cell, forming a reference cycle that
# keeps ``leaves`` (a step's tensors, a segment's recomputed graph) alive until Python's
# cycle collector happens to run. Module-level helpers are freed by refcount on return.
def _walk(node: Tree, leaves: list[Any]) -> TreeDef:
    # tensors and plain dicts first: they are nearly every node of a state, and this runs
    # several times per inner step
    if isinstance(node, torch.Tensor):
        leaves.append(node)
        return _LEAF
    if type(node) is dict:
        keys = tuple(node)
        return TreeDef("dict", keys, tuple(_walk(node[k], leaves) for k in keys))
    kind, meta, children, _ = _node(node)
    if kind == "leaf":
        leaves.append(node)
        return _LEAF
    return TreeDef(kind, meta, tuple(_walk(c, leaves) for c in children))


def _collect(node: Tree, leaves: list[Any]) -> None:
    """The leaves of :func:`_walk`, in its order, without building the structure."""
    if isinstance(node, torch.Tensor):
        leaves.append(node)
    elif isinstance(node, dict):
        for v in node.values():
            _collect(v, leaves)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _collect(v, leaves)
    elif node is not None:
        leaves.append(node)


def _build(d: TreeDef, it: Iterator[Any]) -> Tree:
    if d.kind == "leaf":
        return next(it)
    if d.kind == "none":
        return None
    kids = [_build(c, it) for c in d.children]
    if d.kind == "dict":
        return dict(zip(d.meta, kids, strict=True))
    if d.kind == "namedtuple":
        return d.meta(*kids)
    return kids if d.kind == "list" else tuple(kids)


_LEAF = TreeDef("leaf")


def tree_unflatten(treedef: TreeDef, leaves: list[Any]) -> Tree:
    """Inverse of :func:`tree_flatten`."""
    it = iter(leaves)
    out = _build(treedef, it)
    if next(it, None) is not None:
        raise TreeStructureError("tree_unflatten: more leaves than the structure holds")
    return out


def tree_leaves(tree: Tree) -> list[Any]:
    leaves: list[Any] = []
    _collect(tree, leaves)
    return leaves


def tree_paths(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, leaf)`` pairs, in the order of :func:`tree_leaves`."""
    kind, _, children, labels = _node(tree)
    if kind == "leaf":
        yield prefix or "<root>", tree
        return
    for label, child in zip(labels, children, strict=True):
        yield from tree_paths(child, f"{prefix}.{label}" if prefix else label)


def _describe_difference(a: Tree, b: Tree, path: str = "") -> str:
    ka, ma, ca, la = _node(a)
    kb, mb, cb, _lb = _node(b)
    where = path or "<root>"
    if ka != kb:
        return f"at {where!r}: a {ka} on one side, a {kb} on the other"
    if ka == "dict" and ma != mb:
        missing, extra = sorted(set(ma) - set(mb)), sorted(set(mb) - set(ma))
        if missing or extra:
            return f"at {where!r}: keys only in the first: {missing}, only in the second: {extra}"
        return f"at {where!r}: same keys in a different order ({list(ma)} vs {list(mb)})"
    if ka == "namedtuple" and ma is not mb:
        return f"at {where!r}: {ma.__name__} vs {mb.__name__}"
    if len(ca) != len(cb):
        return f"at {where!r}: {len(ca)} children vs {len(cb)}"
    for label, x, y in zip(la, ca, cb, strict=True):
        if _node(x)[0] != "leaf" or _node(y)[0] != "leaf":
            msg = _describe_difference(x, y, f"{path}.{label}" if path else label)
            if msg:
                return msg
    return ""


def check_same_structure(a: Tree, b: Tree, *, what: str, fix: str = "") -> None:
    """Raise :class:`TreeStructureError` naming the first path where ``a`` and ``b`` differ."""
    if tree_flatten(a)[1] == tree_flatten(b)[1]:
        return
    msg = f"{what}: the two trees differ {_describe_difference(a, b)}."
    raise TreeStructureError(msg + (f" {fix}" if fix else ""))


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over trees of the same structure."""
    leaves, treedef = tree_flatten(tree)
    others = []
    for r in rest:
        rl, rd = tree_flatten(r)
        if rd != treedef:
            check_same_structure(tree, r, what="tree_map")
        others.append(rl)
    return tree_unflatten(treedef, [fn(*xs) for xs in zip(leaves, *others, strict=True)])


def is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def tree_detach(tree: Tree) -> Tree:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def tree_clone(tree: Tree) -> Tree:
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def tree_zeros_like(tree: Tree) -> Tree:
    return tree_map(lambda x: torch.zeros_like(x) if isinstance(x, torch.Tensor) else x, tree)


def tree_dot(a: Tree, b: Tree) -> torch.Tensor:
    """Sum over leaves of ``<a_i, b_i>`` (leaves must be tensors)."""
    terms = [(x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def tree_norm(tree: Tree) -> torch.Tensor:
    """Global L2 norm over all tensor leaves."""
    leaves = [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in leaves]))


def tree_all_finite(tree: Tree, *, checked: Tree | None = None) -> torch.Tensor:
    """A 0-d bool tensor, True when every floating leaf is finite (no host sync).

    NaN and ±inf survive a sum, so one sum per leaf is checked instead of a full
    ``isfinite`` pass: about five times cheaper on the hot path of an unroll. The price is
    a false alarm if finite values overflow when summed (|values| ~ 1e38 / numel in float32),
    by which point training has diverged anyway.

    ``checked``: a tree of the same structure already checked (the previous step's state);
    a leaf that *is* its leaf there (the same tensor object, passed through unchanged, such
    as a momentum buffer without momentum or a frozen statistic) is not summed again.
    """
    leaves = tree_leaves(tree)
    old = tree_leaves(checked) if checked is not None else []
    if len(old) != len(leaves):
        old = [None] * len(leaves)
    with torch.no_grad():
        sums = [x.detach().sum() for x, o in zip(leaves, old, strict=True)
                if is_float_tensor(x) and x is not o]
        return torch.isfinite(torch.stack(sums).sum()) if sums else torch.ones((), dtype=torch.bool)
