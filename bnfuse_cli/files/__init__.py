"""The files layer: checkpoints read safely, outputs written atomically and proved on disk, and a source
(a model name or a file) turned into a ready module. Importing it imports nothing heavy.

``read`` reads every checkpoint form (``integrity`` refuses damaged files first, ``unpickle`` runs no code
from them); ``write`` writes outputs, ``place`` puts them in place and ``readback`` proves them (``formats``:
what both share; ``temporaries``: where unfinished and scratch files live); ``export`` and ``onnxfile`` make
and open programs (``pt2archive`` and ``pt2graph`` check a ``.pt2`` before torch reads it); ``models`` builds
a module from a name and ``load`` turns a source into a ready module.
"""
