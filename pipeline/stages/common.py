"""Small helpers shared by stage entry points: reading splits."""

from __future__ import annotations

from pipeline import paths
from pipeline.errors import DataError
from pipeline.io import read_json


def read_split(stage: str, side: str, split: str) -> list[dict]:
    """Records of one split as written by ``stage`` (``data`` or ``filter``)."""
    records = read_json(paths.split_file(stage, side, split))
    if not records:
        raise DataError(f"{paths.split_file(stage, side, split)} is empty",
                        "enlarge the split in conf/data or disable data.filter for it")
    return records


def instructions(records: list[dict]) -> list[str]:
    return [r["instruction"] for r in records]
