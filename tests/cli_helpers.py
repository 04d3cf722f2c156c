"""Helpers shared by the CLI tests: invoke the Click app, check a one-line user error."""

from divfast.cli.main import cli


def invoke(runner, args):
    return runner.invoke(cli, [str(a) for a in args], prog_name="divfast")


def assert_user_error(result, flag):
    """Exit status 2, exactly one ``Error: `` line on stderr naming ``flag``, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert flag in errors[0], errors[0]
    assert result.stdout == ""
