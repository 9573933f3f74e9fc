"""Tests of ``nti_lightning.p2p`` and ``nti edit``, one file per module (a package, so names like test_cli.py
do not collide with the top-level tests)."""
