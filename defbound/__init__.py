"""Deep exponential families in Pyro, fitted with the forest-mixture (FM) bound."""

__version__ = "0.1.0"
