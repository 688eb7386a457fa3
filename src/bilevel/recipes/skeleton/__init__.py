"""The skeleton recipe: a whole recipe folder in three files, to copy for a new paper.

``recipe.py`` learns the ridge penalty of a linear regression by back-propagating through
gradient descent; ``configs/skeleton/ridge.yaml`` runs it; this file declares the folder.
Copy the folder under a new name, rename the recipe below, and ``bilevel run`` finds it:
nothing else in the project needs an edit (``docs/architecture.md``).
"""

from bilevel.recipes.package import Package

PACKAGE = Package(help="template: learn a ridge penalty by unrolled hypergradients",
                  recipes={"skeleton": ".recipe"})
