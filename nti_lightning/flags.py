"""Command-line flags as aliases of config keys: each flag given becomes the dotlist override of its key."""

from __future__ import annotations

import argparse
import json


def flag_overrides(args: argparse.Namespace, flag_keys: dict[str, str]) -> list[str]:
    """``key=value`` for every flag of ``flag_keys`` (argparse dest → config key) that was given, the value as
    JSON, which OmegaConf reads as YAML: paths with ':' ',' or spaces survive."""
    given = ((key, getattr(args, dest, None)) for dest, key in flag_keys.items())
    return [f"{key}={json.dumps(value)}" for key, value in given if value is not None]
