"""Evaluation on PIE-Bench-format data (Ju et al., ICLR 2024): loader, metrics, reports, other inverters' guidance."""
