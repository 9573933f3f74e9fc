"""The inversion methods by name (a light module: the CLI's help lists them without importing torch)."""

METHODS = ("ddim", "nti", "npi", "proxnpi", "direct")
"""The inverters ``inversion.method`` chooses from (``inverters.py``; docs/eval.md has their citations)."""
