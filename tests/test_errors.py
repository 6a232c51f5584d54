"""octsam.errors.cli_main: one way for every command line to report a user error (message on stderr, exit 2)."""

import importlib

import pytest

from octsam.errors import EXIT_USER_ERROR, OctSamError, cli_main


def test_user_error_prints_message_and_returns_2(capsys):
    @cli_main
    def main(argv=None):
        raise OctSamError(f"bad input {argv!r}; pass --fix.")

    assert main(["x"]) == EXIT_USER_ERROR == 2
    captured = capsys.readouterr()
    assert captured.err == "error: bad input ['x']; pass --fix.\n"
    assert captured.out == "" and "Traceback" not in captured.err


def test_return_value_other_errors_and_metadata_pass_through(capsys):
    @cli_main
    def main(argv=None):
        """Docstring of the entry point."""
        if argv == ["boom"]:
            raise ValueError("a bug, not a user error")
        return len(argv or [])

    assert main(["a", "b", "c"]) == 3 and main() == 0
    with pytest.raises(ValueError, match="a bug"):
        main(["boom"])
    assert main.__name__ == "main" and main.__doc__ == "Docstring of the entry point."
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "module",
    [
        "dataset_builder.__main__",
        "octsam.cli.demo",
        "octsam.cli.evaluate",
        "octsam.cli.hub",
        "octsam.cli.infer",
        "octsam.cli.train",
    ],
)
def test_every_command_line_uses_it(module):
    main = importlib.import_module(module).main
    assert getattr(main, "__wrapped__", None) is not None and main.__module__ == module
