"""The BraTS-Path label schemas: class codes, their integer labels and the penalty label of each challenge year.

    python -c "from pathology_brats.schema import get_schema; s = get_schema('2025'); print(s.classes, s.penalty)"

2024 had six classes (MWod/BraTS-Path-2024), 2025 nine in the organisers' order (0 CT ... 8 PL), 2026 ten in
alphabetical order with "none of the above" last. A missing or unreadable prediction is scored as the penalty
label (6, 9, 10), which the scorer counts as one more class.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError

NAMES = {"CT": "cellular tumor", "PN": "pseudopalisading necrosis", "MP": "microvascular proliferation",
         "NC": "geographic necrosis", "IC": "infiltration into cortex", "WM": "penetration into white matter",
         "LI": "leptomeningeal infiltration", "DM": "dense macrophages", "PL": "presence of lymphocytes",
         "NOTA": "none of the above"}


@dataclass(frozen=True)
class Schema:
    """One year's classes (index = integer label) and penalty label."""

    year: str
    classes: tuple[str, ...]
    penalty: int

    @property
    def num_scored_classes(self) -> int:
        """Classes the scorer counts: the schema's plus the penalty label."""
        return len(self.classes) + 1

    def label(self, value: object) -> int:
        """The integer label of a class code (``CT``, any case) or of an integer code (``3``, ``"3"``, ``3.0``)."""
        text = str(value).strip()
        if text.upper() in self.classes:
            return self.classes.index(text.upper())
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and number.is_integer() and 0 <= int(number) < len(self.classes):
            return int(number)
        raise ValueError(f"{value!r} is not a class of the {self.year} schema ({', '.join(self.classes)} or "
                         f"0-{len(self.classes) - 1})")


SCHEMAS = {
    "2024": Schema("2024", ("WM", "CT", "PN", "NC", "MP", "IC"), 6),
    "2025": Schema("2025", ("CT", "PN", "MP", "NC", "IC", "WM", "LI", "DM", "PL"), 9),
    "2026": Schema("2026", ("CT", "DM", "IC", "LI", "MP", "NC", "PL", "PN", "WM", "NOTA"), 10),
}


def get_schema(year: str | int) -> Schema:
    schema = SCHEMAS.get(str(year))
    if schema is None:
        raise ConfigError("--schema", f"unknown schema {year!r}; choose {', '.join(SCHEMAS)}")
    return schema


__all__ = ["Schema", "SCHEMAS", "NAMES", "get_schema"]
