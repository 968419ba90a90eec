"""The README's commands work as written.

- Every fenced shell block in README.md carries a visible marker on the line before it:
  ``<sub>tested: ...</sub>`` (run here), ``<sub>not run here: ...</sub>`` /
  ``<sub>not run by the tests: ...</sub>`` (GPU, external API, long runs) or
  ``<sub>covered by <test>: ...</sub>`` (an existing test runs the same thing with small limits).
- The blocks marked tested run as written, with bash, in a scratch folder (holding a link to the
  repository's ``data/``) and with the virtual environment's ``bin`` first on PATH. A block made of
  ``grace serve ...`` lines is a service: it is started in the background on the ports the README
  uses (the settings' defaults), the test waits until it is ready, then runs the other blocks
  against it. Nothing in a block is rewritten, so a changed flag or port breaks this test.
- The command table lists exactly the commands that ``grace`` has.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main

from shared.process import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"<sub>((?:tested|not run here|not run by the tests|covered by [^:]+):.*?)</sub>\s*$", re.S)
HEALTH_PATHS = {"rollout": "/health", "reward": "/ready", "judge": "/health"}
SERVICE_START_TIMEOUT_S = 180
BLOCK_TIMEOUT_S = 120
# Concurrent pytest sessions on one machine take the README's fixed ports in turn.
PORT_LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "grace-readme-ports.lock"


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None

    @property
    def tested(self) -> bool:
        return bool(self.marker) and self.marker.startswith("tested:")

    @property
    def commands(self) -> list[str]:
        return [line for line in self.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    @property
    def is_service(self) -> bool:
        return bool(self.commands) and all(c.lstrip().startswith("grace serve ") for c in self.commands)

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        # the marker: the paragraph lines right before the fence, from the one holding <sub> to the one ending </sub>
        marker = None
        if i > 0 and lines[i - 1].rstrip().endswith("</sub>"):
            start = next((k for k in range(i - 1, -1, -1) if "<sub>" in lines[k] or not lines[k].strip()), i - 1)
            match = MARKER.search(" ".join(lines[start:i]))
            marker = " ".join(match.group(1).split()) if match else None
        blocks.append(Block(i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker))
        i = end + 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in SHELL_LANGS]


def readme_env() -> dict[str, str]:
    """A user's environment: no GRACE_* settings or REDIS_URL from the test run (the model cache stays)."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("GRACE_") or k in ("REDIS_URL", "PYTEST_CURRENT_TEST"))}
    if "GRACE_HOME" in os.environ:
        env["GRACE_HOME"] = os.environ["GRACE_HOME"]
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def service_address(block: Block) -> tuple[str, str, int]:
    """(service, host, port) of a `grace serve NAME [--host H] [--port P]` block; defaults from the settings."""
    import importlib

    (command,) = block.commands
    argv = shlex.split(command, comments=True)
    name = argv[2]
    settings = next(
        cls for cls in vars(importlib.import_module(f"services.{name}.config")).values()
        if isinstance(cls, type) and "port" in getattr(cls, "model_fields", {}) and cls.__module__.endswith(f"{name}.config")
    )  # fmt: skip
    host = argv[argv.index("--host") + 1] if "--host" in argv else settings.model_fields["host"].default
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else settings.model_fields["port"].default
    return name, "127.0.0.1" if host == "0.0.0.0" else host, port


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


# ----------------------------------------------------------------------------- the markers


def test_readme_blocks_are_found():
    assert len(shell_blocks()) >= 8
    assert any(b.tested and b.is_service for b in shell_blocks()), "no service block is tested"


def test_every_shell_block_is_marked():
    unmarked = [str(b) for b in shell_blocks() if not b.marker]
    assert not unmarked, f"shell blocks without a <sub>tested: / not run here: / covered by ...: </sub> line: {unmarked}"
    for block in shell_blocks():
        if block.marker.startswith("covered by "):
            test_file = block.marker[len("covered by ") :].split(":")[0].split(" and ")
            for path in test_file:
                path = path.split(",")[0].strip()
                assert (ROOT / path).is_file(), f"{block}: {path} does not exist"
        if block.tested:
            assert "tests/docs/test_readme.py" in block.marker, block


def test_marker_parsing():
    text = (
        "x\n\n<sub>tested: a\nb</sub>\n```bash\necho 1\n```\n```bash\necho 2\n```\n<sub>covered by t.py: y</sub>\n```sh\nz\n```\n"
    )
    first, second, third = readme_blocks(text)
    assert (first.marker, first.code, first.tested) == ("tested: a b", "echo 1\n", True)
    assert second.marker is None
    assert third.marker == "covered by t.py: y" and third.lang == "sh"


# ----------------------------------------------------------------------------- the tested blocks, run as written


@pytest.fixture(scope="module")
def readme_workdir(tmp_path_factory, tiny_models):
    """The scratch folder the blocks run in, with the README's services up on their fixed ports."""
    work = tmp_path_factory.mktemp("readme")
    (work / "data").symlink_to(ROOT / "data")
    env = readme_env()
    PORT_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(PORT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session running these blocks holds the ports until it is done
        processes = []
        try:
            for block in (b for b in shell_blocks() if b.tested and b.is_service):
                name, host, port = service_address(block)
                if port_in_use(host, port):
                    pytest.fail(f"{block} starts {name} on {host}:{port}, which something else already uses")
                process = ServiceProcess(
                    name, ["bash", "-c", block.code], work / f"{name}.log",
                    health_url=f"http://{host}:{port}{HEALTH_PATHS[name]}", cwd=work,
                )  # fmt: skip
                process.env = env
                processes.append(process.start())
                process.wait_healthy(timeout=SERVICE_START_TIMEOUT_S)
            yield work, env
        finally:
            for process in reversed(processes):
                process.stop()


def _tested_command_blocks() -> list[Block]:
    return [b for b in shell_blocks() if b.tested and not b.is_service]


@pytest.mark.parametrize("block", _tested_command_blocks(), ids=str)
def test_readme_block_runs_as_written(block: Block, readme_workdir):
    work, env = readme_workdir
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=work, env=env, capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S,
    )  # fmt: skip
    detail = f"{block} exited {result.returncode} after {time.monotonic() - started:.1f}s\n--- block\n{block.code}" \
             f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"  # fmt: skip
    assert result.returncode == 0, detail
    if "/v1/score" in block.code:  # the curl answer, then the file `grace score` wrote
        answer, _ = json.JSONDecoder().raw_decode(result.stdout, result.stdout.index("{"))  # curl prints no newline
        (group,) = answer["groups"]
        assert [r["parsed"] for r in group["results"]] == [True, False], detail
        scored = [json.loads(line) for line in (work / "scored.jsonl").read_text().splitlines()]
        assert len(scored) == 1, detail
    if block.code.startswith("grace --help"):
        assert "serve" in result.stdout and "eval" in result.stdout, detail


# ----------------------------------------------------------------------------- the command table


def cli_commands() -> set[str]:
    """Every command path of `grace`, e.g. "serve reward", "eval", "eval context" (a group whose callback
    runs without a subcommand is a command too)."""
    from shared.cli import app

    found: set[str] = set()

    def walk(command, path: tuple[str, ...]) -> None:  # typer 0.29 vendors click: a group is what has commands
        if hasattr(command, "commands"):
            if path and getattr(command, "invoke_without_command", False):
                found.add(" ".join(path))
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            found.add(" ".join(path))

    walk(typer.main.get_command(app), ())
    return found


def table_commands() -> set[str]:
    """Command paths in the README's "## Commands" table: `grace a\\|b [--opt] ARG` -> {"a", "b"}."""
    section = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    for row in (line for line in section.splitlines() if line.startswith("| `grace")):
        cell = row.split(" | ")[0]
        for span in re.findall(r"`(grace [^`]*)`", cell):
            words = []
            for word in span.replace("\\|", "|").split()[1:]:
                if word.startswith(("-", "[")) or not re.fullmatch(r"[a-z][a-z0-9|-]*", word):
                    break
                words.append(word.split("|"))
            paths = [[]]
            for options in words:
                paths = [[*p, o] for p in paths for o in options]
            found.update(" ".join(p) for p in paths)
    return found


def test_command_table_matches_the_cli():
    cli, table = cli_commands(), table_commands()
    assert {"serve reward", "serve trainer", "eval", "eval context", "score", "models tiny"} <= cli
    assert not cli - table, f"commands missing from the README's table: {sorted(cli - table)}"
    assert not table - cli, f"the README's table lists commands grace does not have: {sorted(table - cli)}"


def test_grace_help_lists_the_table(tmp_path):
    """The real entry point, as a user runs it: `grace --help` and each group's help name the table's commands."""
    grace = Path(sys.executable).parent / "grace"
    run = lambda *args: subprocess.run([str(grace), *args], capture_output=True, text=True, env=readme_env(), timeout=60)  # noqa: E731
    top = run("--help")
    assert top.returncode == 0, top.stderr
    for path in table_commands():
        *group, name = path.split()
        shown = run(*group, "--help") if group else top
        assert re.search(rf"│ {re.escape(name)}\b", shown.stdout), f"`grace {path}` not in `grace {' '.join(group)} --help`"


def test_trainer_rejects_host_and_port():
    """The trainer has no HTTP API: --host/--port are not accepted (they used to be accepted and ignored)."""
    grace = Path(sys.executable).parent / "grace"
    result = subprocess.run([str(grace), "serve", "trainer", "--port", "8300"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "No such option: --port" in result.stderr + result.stdout
