"""The README's commands as a new user copies them, from the repository's root in a new shell:
each names a program that is there (a script of the repository, a tool in ``.venv/bin``, or a
system tool the README says to install), and the files and modules it names exist; the
configuration examples are valid. A command that would answer ``command not found`` fails here.

Shell commands are the README's indented code blocks (fenced blocks are code in a language or
expected output)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import need
from tests.vllm.conftest import required, venv_problem

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = Path(sys.prefix) / "bin"  # the tests run from the .venv the README names
# Programs the README runs from the system, each where it says how to get them.
SYSTEM = {"curl", "podman", "apt-get"}
ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")


def shell_commands(text: str) -> list[str]:
    """The commands of the indented code blocks, continuation lines joined."""
    commands: list[str] = []
    fenced = False
    previous = ""
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and (pending or previous.strip() == ""
                                                       or previous.startswith("    ")):
            command = pending + line.strip()
            pending = command[:-1] + " " if command.endswith("\\") else ""
            if not pending:
                commands.append(command)
        if fenced or not line.startswith("    "):
            pending = ""
        previous = line
    return commands


COMMANDS = shell_commands(README.read_text())


def program(words: list[str]) -> tuple[str, list[str]]:
    """The program a command runs, after its VAR=value assignments, and its arguments."""
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    return (words[0], words[1:]) if words else ("", [])


def test_the_readme_has_the_commands_a_new_user_runs() -> None:
    firsts = {program(shlex.split(c, comments=True))[0] for c in COMMANDS}
    assert {"scripts/serve.sh", "scripts/test.sh", "curl", ".venv/bin/vllm-gateway",
            ".venv/bin/python", ".venv/bin/pytest", ".venv/bin/hypercorn"} <= firsts


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_resolves(command: str) -> None:
    name, args = program(shlex.split(command, comments=True))
    if not name:
        return  # only setting a variable (H='...')
    if name.startswith(".venv-vllm/"):  # made by scripts/setup-vllm.sh: the real-vLLM tier's
        need(venv_problem(), required=required())
    if name.startswith(".venv/bin/"):
        path = VENV_BIN / name.removeprefix(".venv/bin/")
        assert os.access(path, os.X_OK), f"{name}: not in the .venv scripts/bootstrap.sh makes"
    elif "/" in name:
        assert os.access(ROOT / name, os.X_OK), f"{name}: not an executable of the repository"
    else:
        assert name in SYSTEM, f"{name}: neither in the repository, nor in .venv/bin, nor a " \
                               "system tool the README says to install"
    if name.endswith("/python") and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
    if name.endswith("/hypercorn"):  # its last argument is the application, MODULE:NAME
        module = args[-1].partition(":")[0]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
    for arg in args:
        value = arg.partition("=")[2] if ASSIGNMENT.match(arg) else arg
        if re.fullmatch(r"(\./)?(examples|deploy|scripts|benchmarks)/[\w./-]+|config\.toml",
                        value):
            assert (ROOT / value).exists(), f"{value}: no such file"


def test_readme_check_config_command_runs() -> None:
    """``vllm-gateway check-config`` as the configuration section shows it."""
    command = next(c for c in COMMANDS if "vllm-gateway check-config" in c)
    words = shlex.split(command, comments=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run([str(VENV_BIN / "vllm-gateway"), *words[1:]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert '"source": "file config.toml"' in result.stdout
