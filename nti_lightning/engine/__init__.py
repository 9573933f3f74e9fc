"""The engine: Algorithm 1 of Mokady et al. (2023) and the other inverters as generators of UNet requests,
the continuous-batching executor that runs them, and the math they use (DDIM, the null-text rules, guidance).
No file I/O lives here."""
