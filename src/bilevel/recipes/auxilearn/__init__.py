"""AuxiLearn (Navon et al., ICLR 2021): auxiliary learning by implicit differentiation.

``recipe`` (the ``auxilearn`` recipe: learned combiners of auxiliary losses), ``tasks`` (the
auxiliary tasks and label splits), ``labels`` (the ``auxilearn_labels`` recipe: a network that
learns *new* auxiliary labels).
"""

from bilevel.recipes.package import Package

PACKAGE = Package(help="AuxiLearn (Navon et al.): auxiliary-loss combiners, learned labels",
                  recipes={"auxilearn": ".recipe", "auxilearn_labels": ".labels"})
