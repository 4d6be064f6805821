"""Run configurations made of sections (dataclasses), read from and written to YAML."""

import dataclasses
from pathlib import Path

import yaml


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
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from None
        return cls.from_dict(values)
