"""Alignment criteria as data: one JSON file per criterion (principles + demonstrations).

Why data and not code: a team adds a criterion by writing one file (bundled ones live in
``synth/criteria/NAME.json``; any other path works too), and the file is validated up front so a
typo fails with the field's name instead of a confusing prompt half-way through a run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

DEMO_FIELDS = ("query", "answer", "critique", "correction")


class CriterionError(ValueError):
    """A criterion file is missing, unreadable or does not follow the schema."""


@dataclass(frozen=True)
class Demonstration:
    query: str
    answer: str  # the misaligned answer
    critique: str
    correction: str  # the aligned answer


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    principles: tuple[str, ...]
    seed_questions: tuple[str, ...]
    demonstrations: tuple[Demonstration, ...]
    version: str = "1"
    path: str = field(default="", compare=False)

    @property
    def digest(self) -> str:
        """Short content hash, recorded as provenance so edited criteria can be told apart."""
        blob = json.dumps([self.name, self.version, self.description, self.principles,
                           self.seed_questions,
                           [(d.query, d.answer, d.critique, d.correction) for d in self.demonstrations]],
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _bundled_dir():
    return resources.files("synth") / "criteria"


def list_criteria() -> list[str]:
    """Names of the criteria shipped with the package."""
    return sorted(p.name[:-5] for p in _bundled_dir().iterdir() if p.name.endswith(".json"))


def _need_str(value, where: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CriterionError(f"{source}: field '{where}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _need_str_list(value, where: str, source: str, minimum: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < minimum:
        raise CriterionError(f"{source}: field '{where}' must be a list of at least {minimum} strings")
    return tuple(_need_str(v, f"{where}[{i}]", source) for i, v in enumerate(value))


def criterion_from_dict(data: dict, source: str = "<dict>") -> Criterion:
    """Validate a parsed criterion; errors name the file and the field."""
    if not isinstance(data, dict):
        raise CriterionError(f"{source}: expected a JSON object at the top level")
    demos_raw = data.get("demonstrations")
    if not isinstance(demos_raw, list) or not demos_raw:
        raise CriterionError(f"{source}: field 'demonstrations' must be a non-empty list of objects "
                             f"with {', '.join(DEMO_FIELDS)}")
    demos = []
    for i, d in enumerate(demos_raw):
        if not isinstance(d, dict):
            raise CriterionError(f"{source}: demonstrations[{i}] must be an object")
        demos.append(Demonstration(**{k: _need_str(d.get(k), f"demonstrations[{i}].{k}", source)
                                      for k in DEMO_FIELDS}))
    version = data.get("version", "1")
    return Criterion(
        name=_need_str(data.get("name"), "name", source),
        description=_need_str(data.get("description"), "description", source),
        principles=_need_str_list(data.get("principles"), "principles", source, 1),
        seed_questions=_need_str_list(data.get("seed_questions"), "seed_questions", source, 3),
        demonstrations=tuple(demos),
        version=str(version),
        path=source,
    )


def load_criterion(name_or_path: str | Path) -> Criterion:
    """Load a bundled criterion by name (``harmlessness``) or any criterion file by path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".json") or path.exists():
        if not path.is_file():
            raise CriterionError(f"criterion file not found: {path}")
        source, raw = str(path), path.read_text(encoding="utf-8")
    else:
        res = _bundled_dir() / f"{text}.json"
        if not res.is_file():
            raise CriterionError(f"unknown criterion {text!r}; bundled: {', '.join(list_criteria())} "
                                 "(or pass the path of a .json criterion file)")
        source, raw = f"synth/criteria/{text}.json", res.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CriterionError(f"{source}: not valid JSON ({e})") from e
    return criterion_from_dict(data, source)
