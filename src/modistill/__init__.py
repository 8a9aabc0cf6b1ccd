"""modistill: distil large vision-language models into small Mixture-of-Experts ones (LLaVA-MoD)."""

__version__ = "0.1.0"
