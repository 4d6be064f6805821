"""Run configurations made of sections (dataclasses), read from and written to YAML."""

import dataclasses
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


class SectionedConfig:
    """A dataclass of config sections; subclasses set SECTIONS = {name: section dataclass}.

    Unknown sections or keys, and missing required fields, are ValueErrors that name them.
    """

    SECTIONS = {}

    @classmethod
    def from_dict(cls, values):
        if not isinstance(values, dict):
            raise ValueError("a config must be a mapping with sections " + ", ".join(cls.SECTIONS))
        unknown = set(values) - set(cls.SECTIONS)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected {sorted(cls.SECTIONS)}")
        sections = {}
        for name, section_class in cls.SECTIONS.items():
            fields = {f.name for f in dataclasses.fields(section_class)}
            given = values.get(name) or {}
            unknown = set(given) - fields
            if unknown:
                raise ValueError(f"unknown keys in config section {name!r}: {sorted(unknown)}; expected some of {sorted(fields)}")
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
