"""Waiting for the `flask ...` processes a test starts with the `flask_command` fixture."""


def finish(process, timeout=120):
    """Wait for `process` to end.  :return: (exit code, stdout, stderr)."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err
