from click.testing import CliRunner

from segdeploy import __version__
from segdeploy.cli import main

COMMANDS = ["train", "export", "validate", "infer", "bench", "demo"]


def test_help_lists_all_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name}" in result.output


def test_each_subcommand_has_help():
    for name in COMMANDS:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: main" in result.output or "Usage: segdeploy" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
