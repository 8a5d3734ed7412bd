"""Random and mutated payloads: only the store's own error may escape the decoders."""

import json
import pickle
import random

import pytest

import aepsych_store

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

SEEDS = [
    pickle.dumps({"type": "tell", "message": {"config": {"x1": [0.1], "x2": [4]}, "outcome": 1}}, protocol=p)
    for p in range(6)
] + [json.dumps({"type": "ask", "message": ""}).encode()]


class FakeConnection:
    """Carries the path that error messages name; the decoders read nothing else."""

    path = "fuzz.sqlite"


def decode(raw):
    try:
        aepsych_store._decode_stored(FakeConnection, raw, "replay_data", "message_contents", 1)
    except aepsych_store.StoreError:
        pass


def mutate(data, rng):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(4)
        position = rng.randrange(len(data) + 1)
        if action == 0 and data:
            data[min(position, len(data) - 1)] = rng.getrandbits(8)
        elif action == 1:
            data[position:position] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        elif action == 2:
            del data[position : position + rng.randint(1, 8)]
        else:
            data[position:position] = data[: rng.randint(0, len(data))]
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_pickle_bytes(raw):
    decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_json_text(text):
    decode(text)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SEEDS), st.integers(min_value=0, max_value=2**32))
def test_fuzz_mutated_payloads(seed, rng_seed):
    mutated = mutate(seed, random.Random(rng_seed))
    decode(mutated)
    try:
        decode(mutated.decode("utf-8"))
    except UnicodeDecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_legacy_config_and_strat(raw):
    for read in (aepsych_store._ini_from_pickled_config, aepsych_store._bytes_from_pickled_bytesio):
        try:
            read(FakeConnection, raw, 1)
        except aepsych_store.StoreError:
            pass
