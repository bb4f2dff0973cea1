"""The files layer: checkpoints read safely, outputs written atomically and proved on disk, and a source
(a model name or a file) turned into a ready module. Importing it imports nothing heavy.

``read`` reads every checkpoint form (``integrity`` refuses damaged files first, ``unpickle`` runs no code
from them); ``write`` places outputs and ``readback`` proves them (``formats``: what both share);
``models`` builds a module from a name and ``load`` turns a source into a ready module.
"""
