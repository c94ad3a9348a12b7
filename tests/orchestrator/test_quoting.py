"""Command lines that go through a shell (the ssh command of a torchrun node, the dry-run text a
user pastes): every value reaches the program exactly, braces included; only the exact
placeholders ``{port}`` and ``{master_addr}`` stay bare, and ``{port}`` is still filled in."""

import json
import subprocess
import sys

import pytest

from orchestrator.launchers.local.plan import format_command
from orchestrator.launchers.local.supervisor import _fill
from orchestrator.launchers.torchrun import ssh_argv

# Prints what it received: the variable V and its arguments.
SHOW = [sys.executable, "-c", "import json, os, sys; print(json.dumps([os.environ.get('V'), sys.argv[1:]]))"]
TRICKY = ["x{a,b}", "a{b,c}", "{1..3}", "${HOME}", "$(id)", "~", "a b", "it's", "*", "{}", "{port}{a,b}"]


def _remote_shell(command: str) -> list:
    """What a program gets when ``command`` is run by a shell, as the remote end of ssh does."""
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("value", TRICKY)
def test_env_values_and_arguments_survive_a_real_shell_unexpanded(value):
    remote = ssh_argv("gpu02", [*SHOW, value, "plain"], {"V": value})[-1]  # what ssh hands the shell
    assert _remote_shell(remote) == [value, [value, "plain"]]


def test_placeholders_stay_readable_and_are_filled_in_at_launch():
    line = format_command(["torchrun", "--rdzv_endpoint", "gpu01:{port}", "--addr", "{master_addr}:{port}"],
                          {"MASTER_PORT": "{port}"})
    assert line == "MASTER_PORT={port} torchrun --rdzv_endpoint gpu01:{port} --addr {master_addr}:{port}"
    remote = _fill(ssh_argv("gpu02", [*SHOW, "gpu01:{port}", "a b:{port}"], {"V": "{port}"})[-1], 29633)
    assert _remote_shell(remote) == ["29633", ["gpu01:29633", "a b:29633"]]


def test_only_exact_placeholders_stay_bare():
    assert format_command(["{port}", "{ports}", "{port", "{a,{port}}", ""], {}) == "{port} '{ports}' '{port' '{a,{port}}' ''"
