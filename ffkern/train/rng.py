"""Seeded random streams keyed by (seed, epoch, step, purpose).

Every random draw of training (shuffling, augmentations, FF negatives) comes from a generator
made here for exactly that draw. A stream depends only on its key, never on what ran before, so
the result does not depend on the order in which layers run: a layer pipeline (one process per
group of layers, issue 6) that prepares batch t on rank 0 gets the same numbers as sequential
training. Layer initialization uses the same idea (one key per layer), so a rank that builds
only its own layers gets the same weights.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

# Purposes: fixed small integers, part of the key.
SHUFFLE, AUGMENT, NEGATIVES, VALID, INIT, LABEL_TOKENS = range(6)


def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed that mixes ``seed`` and ``key`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in key]]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator(seed: int, *key: int, device="cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded by (seed, *key)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(seed, *key))
    return gen


@contextlib.contextmanager
def seeded(seed: int, *key: int):
    """Runs the block (e.g. building one layer) with torch's global CPU RNG set from (seed, *key),
    and restores the previous global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, *key))
        yield
