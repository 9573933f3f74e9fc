"""The commands' jobs (``nti invert``, ``nti eval``, ``nti edit --edits``) on top of the run layer (``run/``)."""
