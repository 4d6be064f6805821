"""Run configurations made of sections (dataclasses), read from and written to YAML."""

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from seq2seq.errors import DataError

RUN_CONFIG = "config.yaml"  # every run directory's resolved config; its presence marks a run


def is_run_dir(path):
    return (Path(path) / RUN_CONFIG).is_file()


def _one_line(yaml_error):
    """A YAML parse error as one line: where it is and what is wrong (PyYAML's own message
    spans several lines with a drawing of the spot)."""
    mark = getattr(yaml_error, "problem_mark", None)
    problem = getattr(yaml_error, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(yaml_error).split())


def option(default, doc, choices=None, if_none=None, bounds=None, may_change_on_resume=False):
    """A config field with its one-line doc for the user (what `--help` shows); for a field with a
    fixed set of values, `choices`: a sequence, or a function of the config class (for a set a
    subclass changes), which `check_choices` holds the field to; for a number, `bounds`: the
    interval it must lie in, written as in mathematics ("(0, inf)", "[0, 1)", "[1, inf)"); for a
    field that may be None, `if_none`: what None does ("units", "no validation").
    `may_change_on_resume`: a run started again on its output dir may take a new value of it
    (how long or how visibly it trains, not what or how it learns; see `seq2seq.run.open_run`)."""
    metadata = {
        "doc": doc, "choices": choices, "if_none": if_none, "bounds": Bounds.parse(bounds) if bounds else None,
        "may_change_on_resume": may_change_on_resume,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval of numbers, from its written form: "[0, 1)" holds 0 but not 1, "(0, inf)" the positives."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text):
        low, high = (part.strip() for part in text.strip()[1:-1].split(","))
        return cls(float(low), float(high), text.strip()[0] == "[", text.strip()[-1] == "]")

    def __contains__(self, value):
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self):
        """What a value must be, as an error or --help says it: "positive", "at least 1", "in [0, 1)"."""
        low = int(self.low) if self.low.is_integer() else self.low
        if math.isinf(self.high):
            if self.low_closed:
                return f"at least {low}"
            return "positive" if low == 0 else f"above {low}"
        high = int(self.high) if self.high.is_integer() else self.high
        return f"in {'[' if self.low_closed else '('}{low}, {high}{']' if self.high_closed else ')'}"


def with_default(base, name, default):
    """Field `name` of config dataclass `base` again, with another default (doc and choices kept)."""
    [field] = [field for field in dataclasses.fields(base) if field.name == name]
    return dataclasses.field(default=default, metadata=field.metadata)


def field_doc(field):
    return field.metadata.get("doc", "")


def field_default(field):
    """The default of a config field as a user reads it: what None does, when the field says."""
    if field.default is None and field.metadata.get("if_none"):
        return field.metadata["if_none"]
    return field.default


def field_choices(config_class, field):
    """The values `field` of `config_class` may take, or None when any value of its type may do."""
    choices = field.metadata.get("choices")
    if callable(choices):
        choices = choices(config_class)
    return None if choices is None else tuple(choices)


def field_bounds(field):
    """The Bounds a number field must lie in, or None."""
    return field.metadata.get("bounds")


def may_change_on_resume(field):
    return field.metadata.get("may_change_on_resume", False)


def check_choices(section, prefix=""):
    """A ValueError naming the first field of dataclass `section` whose value its declaration does
    not allow: not one of its choices, or not a finite number (an integer for an int field) within
    its bounds. None passes where the field may be None (its type or default says so: unset)."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if value is None and _may_be_none(field):
            continue
        choices = field_choices(type(section), field)
        if choices is not None and value not in choices:
            raise ValueError(f"{prefix}{field.name} must be one of {list(choices)}, got {value!r}")
        bounds = field_bounds(field)
        if bounds is not None:
            _check_number(f"{prefix}{field.name}", value, bounds, integer=_number_type(field) is int)


def _check_number(name, value, bounds, integer):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = _yaml_number_hint(value) if isinstance(value, str) else ""
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}{hint}")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value not in bounds:
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _yaml_number_hint(text):
    """How to write a number that YAML read as text: PyYAML takes 1e-3, without a dot, for a string."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    try:
        float(text)
    except ValueError:
        return ""
    if not exponent or "." in mantissa:
        return ""
    return f" (YAML reads {text} as text: write {mantissa}.0e{exponent})"


def _field_types(field):
    """The types a field's annotation names: (int,), (int, NoneType), ..."""
    annotation = field.type
    if isinstance(annotation, str):  # postponed annotations: "int | None"
        names = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
        return tuple(names.get(part.strip(), object) for part in annotation.split("|"))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _number_type(field):
    return int if int in _field_types(field) and float not in _field_types(field) else float


def _may_be_none(field):
    return field.default is None or type(None) in _field_types(field)


def unknown_names_error(unknown, valid, what, where=""):
    """A one-line ValueError for `unknown` names ("lerning_rate") among `valid` ones: each with the
    closest valid name when one is close, and the valid names when some unknown one has none."""
    valid = list(valid)
    hints = {name: difflib.get_close_matches(str(name), valid, n=1) for name in sorted(unknown, key=str)}
    listing = f"; valid {what}s: {', '.join(valid)}"
    if len(hints) == 1:
        [(name, close)] = hints.items()
        return ValueError(f"unknown {what} {name!r}{where}" + (f"; did you mean {close[0]!r}?" if close else listing))
    named = ", ".join(
        f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name) for name, close in hints.items()
    )
    return ValueError(f"unknown {what}s{where}: {named}" + ("" if all(hints.values()) else listing))


class SectionedConfig:
    """A dataclass of config sections; subclasses set SECTIONS = {name: section dataclass}.

    Unknown sections or keys (named with the closest valid name), and missing required fields,
    are ValueErrors that name them.
    """

    SECTIONS = {}
    # {section: names of the fields the values of `from_dict` gave}: what the user set (in a
    # config file or a flag), which a resumed run holds to its saved config. None: every field.
    given = None

    @classmethod
    def check_names(cls, values):
        """A ValueError for a section or key of the mapping `values` that the config does not have."""
        if not isinstance(values, dict):
            raise ValueError("a config must be a mapping with sections " + ", ".join(cls.SECTIONS))
        unknown = set(values) - set(cls.SECTIONS)
        if unknown:
            raise unknown_names_error(unknown, cls.SECTIONS, "config section")
        for name, section_class in cls.SECTIONS.items():
            given = values.get(name) or {}
            if not isinstance(given, dict):
                raise ValueError(f"config section {name!r} must be a mapping of keys to values, got {given!r}")
            keys = [field.name for field in dataclasses.fields(section_class)]
            unknown = set(given) - set(keys)
            if unknown:
                raise unknown_names_error(unknown, keys, "key", f" in config section {name!r}")

    @classmethod
    def from_dict(cls, values):
        cls.check_names(values)
        sections = {}
        for name, section_class in cls.SECTIONS.items():
            given = values.get(name) or {}
            try:
                sections[name] = section_class(**given)
            except TypeError as error:  # a required field (training.output_dir) is missing
                raise ValueError(f"config section {name!r}: {error}") from None
        config = cls(**sections)
        config.given = {name: set(values.get(name) or {}) for name in cls.SECTIONS}
        return config

    def to_dict(self):
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    def save(self, path):
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def read_values(cls, path):
        """The mapping a YAML config file holds; ValueErrors name the file and what is wrong."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not a config file")
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not valid UTF-8 (byte {error.start}: {error.reason})") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({_one_line(error)})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping with sections " + ", ".join(cls.SECTIONS))
        try:
            cls.check_names(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return values

    @classmethod
    def load(cls, path):
        return cls.from_dict(cls.read_values(path))

    @classmethod
    def load_run(cls, run_dir, task):
        """The config.yaml of a `task` ("translation", ...) run directory, with its output dir
        set to where the run is now (it may have moved since training)."""
        path = Path(run_dir) / RUN_CONFIG
        if not path.is_file():
            raise DataError(f"{run_dir}: not a {task} run directory (no config.yaml)")
        config = cls.load(path)
        config.training.output_dir = str(run_dir)
        return config

    @classmethod
    def values_with_overrides(cls, path, overrides):
        """The mapping of an optional YAML file (None: none) with {section: {field: value}}
        overrides laid on top, as `train --config FILE --flag value` builds it."""
        values = cls.read_values(path) if path else {}
        for section, fields in overrides.items():
            values[section] = {**(values.get(section) or {}), **fields}
        return values
