"""--help that explains: every flag of both CLIs has a description and its default, config fields
show their choices, and an unknown YAML key is an error naming the closest valid one."""

import argparse
import dataclasses

import pytest

from seq2seq import caption, translate
from seq2seq.config import field_choices, field_doc
from seq2seq.tasks.captioning.config import CaptionConfig
from seq2seq.tasks.translation.config import TranslationConfig

CLIS = {"translate": translate, "caption": caption}
CONFIGS = {"translate": TranslationConfig, "caption": CaptionConfig}


def subcommands(parser):
    """(name, parser) of every subcommand of `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def every_parser():
    """(description, parser) of each CLI's top-level parser and of every subcommand."""
    for name, module in CLIS.items():
        parser = module.build_parser()
        yield name, parser
        for command, subparser in subcommands(parser):
            yield f"{name} {command}", subparser


def flag(parser, option):
    [action] = [action for action in parser._actions if option in action.option_strings]
    return action


def subcommand(cli_name, command):
    return dict(subcommands(CLIS[cli_name].build_parser()))[command]


def test_every_flag_has_a_description_and_its_default():
    for where, parser in every_parser():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):  # they exit at once
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{where}: {name} has no help"
            if not action.required:
                assert "default" in action.help or "required" in action.help, (
                    f"{where}: {name} does not say its default: {action.help!r}"
                )


@pytest.mark.parametrize("cli_name", CLIS)
def test_every_config_field_has_a_doc(cli_name):
    for section_name, section_class in CONFIGS[cli_name].SECTIONS.items():
        for field in dataclasses.fields(section_class):
            assert field_doc(field).strip(), f"{section_name}.{field.name} has no doc"


@pytest.mark.parametrize("cli_name", CLIS)
def test_train_flags_show_the_choices_of_their_field(cli_name):
    train = subcommand(cli_name, "train")
    for section_class in CONFIGS[cli_name].SECTIONS.values():
        for field in dataclasses.fields(section_class):
            choices = field_choices(section_class, field)
            if choices:
                shown = "{" + ",".join(str(choice) for choice in choices if choice is not None) + "}"
                assert flag(train, "--" + field.name.replace("_", "-")).metavar == shown, field.name


@pytest.mark.parametrize("cli_name, option, shown", [
    ("translate", "--cell-type", "{simple_rnn,lstm,gru}"),
    ("translate", "--encoder-type", "{rnn,transformer}"),
    ("translate", "--decoder-type", "{rnn,transformer}"),
    ("translate", "--scheme", "{word,sentencepiece}"),
    ("translate", "--precision", "{auto,float32,bf16,fp16}"),
    ("translate", "--distribution", "{none,mirrored,multi_worker}"),
    ("translate", "--decay", "{inverse_sqrt,cosine,constant}"),
    ("caption", "--encoder-type", "{cnn}"),
    ("caption", "--attention", "{luong,bahdanau}"),
    ("caption", "--backbone", "{mobilenet_v3_small,efficientnet_b0,inception_v3,resnet50,small_cnn}"),
    ("caption", "--encoder-activation", "{relu,tanh}"),
])
def test_train_help_lists_the_choices(capsys, cli_name, option, shown):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[cli_name].main(["train", "--help"])
    assert exit_info.value.code == 0
    assert f"{option} {shown}" in capsys.readouterr().out


def test_train_help_describes_the_learning_rate(capsys):
    with pytest.raises(SystemExit):
        translate.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--learning-rate FLOAT peak learning rate (after warm-up); positive (default: 0.001)" in text


def test_a_subclass_default_is_the_one_shown():
    """Captioning's ModelConfig re-declares fields of ModelSpec with other defaults."""
    translation, captioning = subcommand("translate", "train"), subcommand("caption", "train")
    assert flag(translation, "--attention").help.endswith("(default: luong)")
    assert flag(captioning, "--attention").help.endswith("(default: bahdanau)")
    assert flag(captioning, "--encoder-type").help.endswith("(default: cnn)")


def error_line(capsys, code):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("cli_name, text, message", [
    ("translate", "training:\n  lerning_rate: 0.01\n",
     "unknown key 'lerning_rate' in config section 'training'; did you mean 'learning_rate'?"),
    ("translate", "model:\n  cel_type: gru\n", "unknown key 'cel_type' in config section 'model'; did you mean 'cell_type'?"),
    ("translate", "trainig:\n  epochs: 2\n", "unknown config section 'trainig'; did you mean 'training'?"),
    ("translate", "data:\n  colour: red\n", "unknown key 'colour' in config section 'data'; valid keys: train_source, "),
    ("translate", "model:\n  unitz: 8\n  cel_type: gru\n",
     "unknown keys in config section 'model': 'cel_type' (did you mean 'cell_type'?), 'unitz' (did you mean 'units'?)"),
    ("caption", "model:\n  backbon: resnet50\n", "unknown key 'backbon' in config section 'model'; did you mean 'backbone'?"),
    ("caption", "data:\n  shapes_trian: 10\n", "unknown key 'shapes_trian' in config section 'data'; did you mean 'shapes_train'?"),
])
def test_unknown_config_keys_are_one_error_line_with_the_closest_name(capsys, tmp_path, cli_name, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    code = CLIS[cli_name].main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run")])
    line = error_line(capsys, code)
    assert line.startswith(f"error: {config}: ") and message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cli_name, flags, message", [
    ("translate", ["--train-tsv", "pairs.tsv", "--cell-type", "lstmm"],
     "model cell_type must be one of ['simple_rnn', 'lstm', 'gru'], got 'lstmm'"),
    ("translate", ["--train-tsv", "pairs.tsv", "--verbose", "3"], "verbose must be one of [0, 1, 2], got 3"),
    ("caption", ["--shapes-train", "4", "--encoder-activation", "sigmoid"],
     "model encoder_activation must be one of [None, 'relu', 'tanh'], got 'sigmoid'"),
])
def test_a_value_outside_the_choices_is_one_error_line(capsys, tmp_path, cli_name, flags, message):
    """The config checks the choices --help shows, for flags and YAML files alike."""
    code = CLIS[cli_name].main(["train", *flags, "--output-dir", str(tmp_path / "run")])
    assert message in error_line(capsys, code)


@pytest.mark.parametrize("cli_name", CLIS)
def test_number_flags_state_the_range_their_config_field_allows(cli_name):
    train = subcommand(cli_name, "train")
    assert "; in [0, 1) (default: " in flag(train, "--dropout").help
    assert "; positive (default: " in flag(train, "--learning-rate").help
    assert "; at least 1 (default: " in flag(train, "--units").help
