"""Every failure of the `bitalloc` command is one line on stderr; library errors exit 2, the traceback only with -v."""

from __future__ import annotations

import pytest

import bitalloc
from bitalloc import cli
from bitalloc.apply import AppliedModelError
from bitalloc.errors import BitallocError, InputError, IntegrityError, OutputExistsError, UnavailableError
from bitalloc.models.hub import ModelNotFoundError
from bitalloc.profiles import ProfileError
from bitalloc.solvers.solution import InfeasibleBudgetError, SolverUnavailableError


def test_library_errors_share_one_base_and_keep_their_builtin_bases():
    for cls in (ProfileError, AppliedModelError, ModelNotFoundError, InfeasibleBudgetError):
        assert issubclass(cls, BitallocError) and issubclass(cls, ValueError)
    assert issubclass(ProfileError, IntegrityError) and issubclass(AppliedModelError, IntegrityError)
    assert issubclass(ModelNotFoundError, InputError)
    assert issubclass(SolverUnavailableError, UnavailableError)
    assert issubclass(OutputExistsError, FileExistsError)
    assert bitalloc.BitallocError is BitallocError


def test_a_foreign_profile_directory_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "meta.json").write_bytes(b"\x00\xff binary, not JSON")
    assert cli.main(["-q", "solve", str(tmp_path), "--budget", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitalloc solve: error: ")
    assert "meta.json" in err and "rerun" in err
    assert "Traceback" not in err


def _raising(exc: BaseException):
    def cmd(args):
        raise exc
    return cmd


@pytest.mark.parametrize("exc, code", [(IntegrityError("the file is damaged"), 2), (KeyError("surprise"), 1)])
def test_any_exception_is_one_line_and_a_traceback_only_with_v(monkeypatch, capsys, exc, code):
    parser = cli.build_parser()
    real = parser.parse_args

    def parse(argv=None):
        args = real(argv)
        args.func = _raising(exc)
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["-q", "info"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("internal error (KeyError)" in err and "-v" in err) if code == 1 else "the file is damaged" in err
    assert cli.main(["-v", "info"]) == code
    assert "Traceback" in capsys.readouterr().err
