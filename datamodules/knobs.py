"""Mapping-valued datamodule knobs (``data.curriculum``, ``data.reward_shaping``): unknown keys
fail with one line naming the key; values given on the command line arrive as strings inside a
mapping and are read as YAML (``--data.curriculum.window=0`` -> 0)."""
from __future__ import annotations

import yaml


def read_knobs(config: dict, known, key: str) -> dict:
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}={config[unknown[0]]!r}: unknown key (known: {', '.join(known)})")
    return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in config.items()}
