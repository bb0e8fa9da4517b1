"""pand: distil vision-language teachers into lightweight students."""

__version__ = "0.1.0"
