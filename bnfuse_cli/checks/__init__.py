"""The one judge of correctness: does a fused model compute what the original computes?

Two checks, and a fold is correct only when both pass:

* **At every fold site**, in float64, whatever precision the model runs in: the fused layer on the
  real activation that reached it (a small crop of it) against the original layer and BatchNorm
  on the same activation, computed from the original weights with ``F.batch_norm``, independent
  of bnfuse's fold arithmetic.  A wrong fold that the model's output hides (saturating
  activations, reduced-precision noise) fails here, by name.
* **End to end**, per output tensor: ``max|fused - ref| <= atol + rtol * max|ref| + k * max|orig - ref|``.
  ``ref`` is the exact output (the original model in float64) and the last term is the
  original's *own* error at the precision in use (TF32 convolutions, float16, autocast), so a
  fold is held to the precision the user deploys in, not to a fixed number that every GPU
  fails.  Where no float64 copy of the model can be afforded (``convert`` folds in place), the
  check runs with reduced-precision math switched off instead and ``ref`` is the original's
  output (``k`` then multiplies zero).

``rtol``/``atol`` have one meaning and one default table (:data:`TOLERANCES`) for ``convert``,
``verify`` and ``bench``.  A model that post-processes its output (score thresholds, top-k, NMS)
is also judged on the tensors that feed post-processing (:mod:`.postproc`), and on its final
outputs where their structure agrees.  Nothing here prints or exits.
"""

from .outputs import (NOISE_FACTOR, TOLERANCES, Comparison, Magnitude, OutputCheck, Tolerance, compare,
                      judge_post_processing, json_number)
from .postproc import SelectionProbe
from .sites import SiteCheck, SiteProbe
from .verdict import Verdict

__all__ = [
    "TOLERANCES",
    "NOISE_FACTOR",
    "Tolerance",
    "Comparison",
    "compare",
    "json_number",
    "OutputCheck",
    "Magnitude",
    "SelectionProbe",
    "judge_post_processing",
    "SiteCheck",
    "SiteProbe",
    "Verdict",
]
