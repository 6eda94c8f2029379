"""The interim demo trains and reports a sensible accuracy (short run)."""

from __future__ import annotations

from normlab.demo import train_digits


def test_bn_trains_digits_quickly() -> None:
    acc_bn, _ = train_digits(True, steps=300)
    assert acc_bn > 0.85
