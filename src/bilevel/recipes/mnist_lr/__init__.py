"""The demo: learn an MLP's learning rates on real MNIST while it trains (``make demo``)."""

from bilevel.recipes.package import Package

PACKAGE = Package(help="demo: learn an MLP's learning rates on MNIST",
                  recipes={"mnist_lr": ".recipe"})
