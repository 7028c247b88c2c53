"""Fuzz the checkpoint loader with truncations and single-bit flips of a real checkpoint in each
format. Every case loads the original weights exactly or fails with a one-line CheckpointError;
nothing else escapes.

What is detected: zip archives (``torch.save``'s default) carry a CRC-32 per member, so every
flip and every truncation is an error. The legacy format and safetensors have no checksum:
truncations and flips in their structure (pickle opcodes, the JSON header) are errors, but a
flip inside the raw tensor bytes loads different weights silently; the test counts those and
checks that they differ only in tensor values (same keys, shapes and dtypes).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from normscope.checkpoint import load_model
from normscope.errors import CheckpointError
from normscope.models import build_model

CASES = 60
TRUNCATIONS = 20


def save(kind: str, state: dict, path: Path) -> None:
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncations_and_bit_flips_load_exactly_or_fail_in_one_line(tmp_path, kind):
    state = build_model("mlp_bn", seed=3).state_dict()
    original = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    save(kind, state, original)
    data = original.read_bytes()
    case = tmp_path / ("case.safetensors" if kind == "safetensors" else "case.pt")
    rng = random.Random(12)
    outcomes = {"exact": 0, "error": 0, "silent": 0}
    for index in range(CASES):
        damaged = bytearray(data)
        if index < TRUNCATIONS:
            damaged = damaged[: rng.randrange(len(damaged))]
        else:
            position = rng.randrange(len(damaged))
            damaged[position] ^= 1 << rng.randrange(8)
        case.write_bytes(bytes(damaged))
        try:
            loaded = load_model(case, "mlp_bn").state_dict()
        except CheckpointError as error:
            assert "\n" not in str(error) and str(case) in str(error)
            outcomes["error"] += 1
            continue
        assert index >= TRUNCATIONS, "a truncated file loaded"
        assert loaded.keys() == state.keys()
        assert all(loaded[k].shape == v.shape and loaded[k].dtype == v.dtype for k, v in state.items())
        outcomes["exact" if all(torch.equal(loaded[k], v) for k, v in state.items()) else "silent"] += 1
    if kind == "zip":
        assert outcomes["silent"] == 0, outcomes
    assert outcomes["error"] >= TRUNCATIONS, outcomes
