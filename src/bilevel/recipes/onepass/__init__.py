"""One-pass weight-update hyperparameter optimisation (Clarke et al., ICLR 2022).

``recipe`` (the ``onepass`` recipe and its search space), ``algos`` (the paper's algorithms),
``inner`` (their training state and the kit step they share), ``task`` (data and model), ``table`` / ``summary`` (the paper's bootstrap table, the sweep
report hook), ``sensitivity`` (the (T, i) heat-map), ``cli`` (``bilevel onepass sensitivity``).
"""

from bilevel.recipes.package import Package

PACKAGE = Package(help="One-pass hyperparameter optimisation (Clarke et al.): sensitivity report",
                  recipes={"onepass": ".recipe"}, cli=".cli",
                  sweep_report=".table:write_report")
