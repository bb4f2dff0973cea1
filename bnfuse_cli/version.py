"""The version of bnfuse, in one place: the package, its reports and the files it writes carry it."""

__version__ = "0.2.0"
