"""Helpers of the bad-input and fault suite (tests/test_faults*.py): run ``moe`` in this
process and check that it answered with one line and the right exit status."""

from __future__ import annotations

from moe import cli


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """``moe ARGV`` in this process: (exit status, stderr lines)."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, [line for line in err.splitlines() if line.strip()]


def assert_one_line(status, lines, *fragments, code=2):
    assert status == code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("moe: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
