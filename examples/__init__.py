"""Shipped examples for bnfuse: ``examples.digits:DigitsCNN`` is used by ``make demo``."""
