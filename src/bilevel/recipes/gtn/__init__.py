"""Generative Teaching Networks (Such et al., ICML 2020): synthetic data and a learned
curriculum that train a fresh learner in a few steps.

``recipe`` (the ``gtn`` recipe), ``teacher`` (generator, curriculum, learner lr/momentum),
``models`` (GoodAI's learner and generator), ``evaluate`` (shuffle test, accuracy plot),
``plots``, ``cli`` (``bilevel gtn shuffle-test|plot``).
"""

from bilevel.recipes.package import Package

PACKAGE = Package(help="Generative Teaching Networks (Such et al.): shuffle test, accuracy plot",
                  recipes={"gtn": ".recipe"}, cli=".cli")
