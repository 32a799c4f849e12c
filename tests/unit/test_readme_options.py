"""Every option a command's --help lists is in the README."""

import argparse
import re
from pathlib import Path

from qemuleak.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_option_in_the_help_is_in_the_readme():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(command, option) for command, parser in sub.choices.items()
               for action in parser._actions for option in action.option_strings
               if option not in ("-h", "--help")
               and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", README)]
    assert not missing, missing
