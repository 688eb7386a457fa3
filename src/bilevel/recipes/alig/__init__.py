"""AliG (Berrada et al., ICML 2020): an optimiser whose step size comes from the loss value.

``recipe`` (the ``alig`` recipe: AliG vs SGD vs Adam), ``copy_task`` (the DNC repeat-copy
task), ``plots``, ``cli`` (``bilevel alig sweep|report``).
"""

from bilevel.recipes.package import Package

PACKAGE = Package(help="AliG (Berrada et al.): learning-rate sweeps and their report",
                  recipes={"alig": ".recipe"}, cli=".cli")
