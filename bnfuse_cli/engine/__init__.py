"""The engine: find fold sites by recorded data flow and fold them.

``record`` (events of one forward pass) -> ``analyse`` (events -> :class:`~.plan.Plan`, with every
site left and its reason) -> ``rewrite`` (apply a plan to the module tree), on top of ``patterns``
(the one table of what folds into what) and ``fold`` (the arithmetic, tensors only).  Nothing
here judges a result (:mod:`bnfuse_cli.checks`) or touches files (:mod:`bnfuse_cli.files`).
"""
