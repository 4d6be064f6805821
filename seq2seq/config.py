"""Run configurations made of sections (dataclasses), read from and written to YAML."""

import dataclasses
import difflib
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


def option(default, doc, choices=None, if_none=None):
    """A config field with its one-line doc for the user (what `--help` shows); for a field with a
    fixed set of values, `choices`: a sequence, or a function of the config class (for a set a
    subclass changes), which `check_choices` holds the field to; for a field that may be None,
    `if_none`: what None does ("units", "no validation")."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices, "if_none": if_none})


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


def check_choices(section, prefix=""):
    """A ValueError naming the first field of dataclass `section` whose value is not one of its
    choices (None passes where None is the default: the field is unset)."""
    for field in dataclasses.fields(section):
        choices = field_choices(type(section), field)
        value = getattr(section, field.name)
        if choices is None or (value is None and field.default is None):
            continue
        if value not in choices:
            raise ValueError(f"{prefix}{field.name} must be one of {list(choices)}, got {value!r}")


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
        return cls(**sections)

    def to_dict(self):
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    def save(self, path):
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def read_values(cls, path):
        """The mapping a YAML config file holds; ValueErrors name the file and what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
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
