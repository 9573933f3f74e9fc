"""Exit statuses of the ``nti`` commands, for scripts and schedulers (one home; imports nothing heavy)."""

EXIT_OK = 0
"""Every image done (inverted now or by an earlier run)."""
EXIT_ERROR = 1
"""An unexpected error (a bug, or a rank launched by this process failed)."""
EXIT_CONFIG_ERROR = 2
"""Bad arguments or configuration, a path that is not there, an output folder made with other settings, or
one locked by another run."""
EXIT_SOME_FAILED = 3
"""Some images failed (recorded in the manifest; ``nti status`` lists why, ``--retry-failed`` redoes them)."""
EXIT_ALL_FAILED = 4
"""Every image failed."""
EXIT_IO_ERROR = 74
"""A file-system error stopped the run (disk full, a read-only or vanished folder): the first cause is printed;
what was finished is recorded and the state of the last checkpoint is kept; fix it and rerun (sysexits EX_IOERR)."""
EXIT_PREEMPTED = 75
"""SIGTERM/SIGUSR1: the state is saved; rerun the same command to resume (sysexits EX_TEMPFAIL)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: the state is saved, as for a preemption."""
