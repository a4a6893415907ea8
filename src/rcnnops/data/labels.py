"""The label map: COCO category ids <-> the models' contiguous labels 1..K.

No torch here: the flow's process reads prepared splits and model files with it
without loading torch (see :mod:`pipelines.retrain`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids <-> contiguous labels 1..K (0 is background)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> LabelMap:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))

    @property
    def num_classes(self) -> int:
        """Number of object classes K (the models add 1 for background)."""
        return len(self.category_ids)

    def label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        return self.category_ids[label - 1]

    def name(self, label: int) -> str:
        return self.names[label - 1]

    def to_json(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "labels": [
                {"label": i + 1, "category_id": c, "name": n}
                for i, (c, n) in enumerate(zip(self.category_ids, self.names, strict=True))
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> LabelMap:
        rows = sorted(data["labels"], key=lambda r: r["label"])
        return cls(tuple(r["category_id"] for r in rows), tuple(r["name"] for r in rows))
