"""The tracker's own settings: the sticky key range a replica may own."""

from __future__ import annotations

import pytest

from carom_tracker.config import KEY_HASH_RANGE, TrackerSettings, sticky_range


@pytest.mark.parametrize("n", [1, 2, 3, 7, 256])
def test_the_ranges_of_n_replicas_cover_the_hash_space_once(n: int) -> None:
    ranges = [sticky_range(f"{i}/{n}") for i in range(n)]
    covered = [h for lo, hi in ranges for h in range(lo, hi + 1)]
    assert covered == list(range(KEY_HASH_RANGE))


@pytest.mark.parametrize("spec", ["2", "2/2", "-1/2", "0/0", "a/b", "0/257", "1/"])
def test_a_bad_range_is_refused_naming_the_key(spec: str) -> None:
    with pytest.raises(ValueError, match="key_range"):
        sticky_range(spec)
    with pytest.raises(ValueError, match="key_range"):
        TrackerSettings(key_range=spec)


def test_no_range_is_auto_split() -> None:
    assert TrackerSettings().key_range == ""
    assert TrackerSettings(key_range="1/2").key_range == "1/2"
