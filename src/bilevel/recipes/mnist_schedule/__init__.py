"""Learn a whole training run's learning-rate and momentum schedule exactly (reversible
unrolling); ``plot`` draws the learned schedule."""

from bilevel.recipes.package import Package

PACKAGE = Package(help="demo: learn a 3000-step lr/momentum schedule exactly",
                  recipes={"mnist_schedule": ".recipe"})
