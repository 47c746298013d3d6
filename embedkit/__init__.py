"""embedkit: fairness audits of CLIP-style medical vision-language models around an embedding store."""

__version__ = "0.1.0"
