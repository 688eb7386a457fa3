"""Teaching with Commentaries (Raghu et al., ICLR 2021).

``weighting`` (Alg. 1, the ``commentaries_weighting`` recipe: an example-weighting teacher
learned by backpropagation through training), ``blending`` (Alg. 2, the
``commentaries_blending`` recipe: label-pair blending learned by implicit differentiation),
``plots``, ``cli`` (``bilevel commentaries student|blend-eval|plot``).
"""

from bilevel.recipes.package import Package

PACKAGE = Package(help="Teaching with Commentaries (Raghu et al.): evaluate learned commentaries",
                  recipes={"commentaries_weighting": ".weighting",
                           "commentaries_blending": ".blending"},
                  cli=".cli")
