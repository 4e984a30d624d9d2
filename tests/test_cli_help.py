"""Every option and argument of every command has help text (issue 19, day one), checked by walking
the parser, so options added later need it too."""

from __future__ import annotations

import argparse

from robustlab.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", helps.get(name), "command"
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action.help, "/".join(action.option_strings) or action.dest


def test_every_command_option_and_argument_has_help():
    missing = [f"{path}: {what}" for path, text, what in _walk(build_parser(), "robustlab")
               if not text or text == argparse.SUPPRESS or not text.strip()]
    assert not missing, "no help text for:\n" + "\n".join(missing)


def test_help_says_what_matters_on_day_one():
    texts = {(path, what): text for path, text, what in _walk(build_parser(), "robustlab")}
    assert "zoo:NAME" in texts[("robustlab eval", "--model")]
    assert "zoo:NAME" in texts[("robustlab perturb", "--model")]
    assert "robustlab list datasets" in texts[("robustlab eval", "--data")]
    assert "test" in texts[("robustlab eval", "--split")]
    assert "SQLite" in texts[("robustlab report", "--db")]
    assert "--model zoo:NAME" in texts[("robustlab zoo add", "--name")]


def test_every_help_page_renders(capsys):
    """argparse expands %(default)s when printing: a stray % breaks a help page only then."""
    def pages(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from pages(sub)

    for parser in pages(build_parser()):
        assert parser.prog in parser.format_help()
