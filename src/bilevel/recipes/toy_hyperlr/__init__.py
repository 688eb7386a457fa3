"""The smallest recipe: learn a regressor's SGD learning rate by hypergradient descent."""

from bilevel.recipes.package import Package

PACKAGE = Package(help="demo: learn a small regressor's SGD learning rate",
                  recipes={"toy_hyperlr": ".recipe"})
