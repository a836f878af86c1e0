"""Every ablation file composes with every base config: in ``--print_config`` of
``--config BASE --config ABLATION`` only the ablation's own keys differ from BASE's, and they hold
the ablation's values (parsed in-process, nothing instantiated)."""
import glob
import os

import pytest
import yaml

from conftest import ROOT, print_config

BASES = ["quickstart", "crl", "libero_smoke", "vla_rl"]
ABLATIONS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "ablations", "*.yaml")))


def leaves(node, prefix=()) -> dict:
    """{key path: value} of a YAML tree; a list or a null is one leaf."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(leaves(v, prefix + (k,)))
        return out
    return {prefix: node}


def printed(*configs) -> dict:
    args = [a for c in configs for a in ("--config", os.path.join(ROOT, "configs", f"{c}.yaml"))]
    return leaves(yaml.safe_load(print_config(*args)))


@pytest.fixture(scope="module")
def base_configs():
    return {b: printed(b) for b in BASES}


def test_every_ablation_file_is_a_few_lines():
    for name in ABLATIONS:
        with open(os.path.join(ROOT, "configs", "ablations", f"{name}.yaml")) as f:
            body = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
        assert len(body) <= 8, f"{name}.yaml: {len(body)} lines of YAML"
        assert not any(line.lstrip().startswith(("trainer:", "callbacks:")) for line in body), name


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_changes_only_its_own_keys(base_configs, base, ablation):
    with open(os.path.join(ROOT, "configs", "ablations", f"{ablation}.yaml")) as f:
        own = leaves(yaml.safe_load(f))
    before, after = base_configs[base], printed(base, f"ablations/{ablation}")

    def owned(path):  # under one of the ablation's keys, above one (a subtree it replaces), or a
        # default field of a typed subtree the ablation creates where the base has null
        if any(path[:len(p)] == p or p[:len(path)] == path for p in own):
            return True
        parent = path[:-1]
        return before.get(parent, "<absent>") in (None, "<absent>") and any(p[:len(parent)] == parent for p in own)

    changed = {p for p in set(before) | set(after) if before.get(p, "<absent>") != after.get(p, "<absent>")}
    assert {p for p in changed if not owned(p)} == set(), f"{ablation} on {base} changed other keys"
    for path, value in own.items():
        if path[-1] == "class_path":  # printed with its module path, as written in the file
            assert after[path] == value
        elif value is None:  # the key or the subtree it nulls
            assert all(after[p] is None for p in after if p[:len(path)] == path), path
        else:
            assert after[path] == value, (path, after.get(path))
