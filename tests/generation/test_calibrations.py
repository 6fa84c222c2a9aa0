"""Speculation timings stored across processes: keys, round trips, unreadable files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from linearize.generation.calibrations import (
    CalibrationStore,
    calibration_key,
    proposer_key,
    shapes_key,
)
from linearize.generation.planner import Calibration
from linearize.generation.speculative import LookupProposer

CALIBRATION = Calibration(step=0.01, verify={1: 0.02, 4: 0.03}, overhead=1e-4, context=7,
                          fast_step=0.005)  # fmt: skip


class _Engine:
    def __init__(self, key: str) -> None:
        self.key = key

    def timing_key(self) -> str:
        return self.key


def _key(engine="graphs reach=256 threads=1", sizes=(1, 2, 4)):
    return calibration_key(_Engine(engine), LookupProposer(), list(sizes), True, 9)


def test_a_calibration_round_trips_through_its_dict():
    data = json.loads(json.dumps(CALIBRATION.to_dict()))  # verify's keys become strings
    assert Calibration.from_dict(data) == CALIBRATION
    assert Calibration.from_dict({**data, "fast_step": None}).fast_step is None
    for bad in ({**data, "verify": {}}, {**data, "step": 0}, {**data, "verify": {"0": 1.0}}):
        with pytest.raises(ValueError, match="not a calibration"):
            Calibration.from_dict(bad)


def test_the_store_reads_back_what_it_stored_under_its_key(tmp_path):
    store = CalibrationStore(tmp_path / "timings")
    key = _key()
    assert store.get(key) is None
    store.put(key, CALIBRATION)
    assert store.get(key) == CALIBRATION
    assert CalibrationStore(tmp_path / "timings").get(key) == CALIBRATION  # another process
    # Any part of the key is another calibration.
    assert store.get(_key(engine="graphs reach=512 threads=1")) is None
    assert store.get(_key(sizes=(1, 2))) is None
    assert CalibrationStore(tmp_path / "timings", refresh=True).get(key) is None
    stored = json.loads(store.path(key).read_text())
    assert stored["key"] == key and stored["measured"]


def test_an_unreadable_stored_file_is_timed_again(tmp_path, caplog):
    store = CalibrationStore(tmp_path)
    key = _key()
    other = {"key": _key(sizes=(9,)), "calibration": CALIBRATION.to_dict()}
    for text in (
        "{not json",
        json.dumps({"key": key, "calibration": {"step": 1}}),
        json.dumps(other),
    ):
        store.path(key).write_text(text)
        with caplog.at_level(logging.WARNING, logger="linearize.generation.calibrations"):
            assert store.get(key) is None
        assert "unreadable" in caplog.text
        caplog.clear()
    store.put(key, CALIBRATION)  # replaced
    assert store.get(key) == CALIBRATION


def test_a_store_that_cannot_be_written_is_skipped(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    store = CalibrationStore(blocked / "timings")  # its parent is a file
    with caplog.at_level(logging.WARNING, logger="linearize.generation.calibrations"):
        store.put(_key(), CALIBRATION)
    assert "could not store" in caplog.text and store.get(_key()) is None


def test_keys_follow_shapes_not_values():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    assert shapes_key(a) == shapes_key(b)  # other weights, same cost
    assert shapes_key(a) != shapes_key(nn.Linear(4, 5))
    assert shapes_key(a) != shapes_key(a.to(torch.float64))
    assert proposer_key(LookupProposer()) == "lookup"


def test_the_key_holds_torch_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _key()
        torch.set_num_threads(2)
        assert _key() != one and one["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
