"""The README's quick start and walk-through, run as a new user runs them: block by block, verbatim, in one
shell, against a real deploy.

Blocks meant to run are marked in README.md with ``<!-- readme-test: NAME -->`` on the line before their
fence. Everything runs in a network namespace of its own (``unshare --net``), so the README's default ports
(8080, 8443, 9000, 11501-11503) are free whatever else this machine runs, and ``ISHGW_HOME`` is a temporary
directory. Each block has a time limit and an expectation on what it prints.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, base_env

pytestmark = pytest.mark.deploy

README = ROOT / "README.md"
MARK = re.compile(r"^<!-- readme-test: ([a-z0-9-]+) -->\n```(bash|sh)\n(.*?)^```\n", re.M | re.S)
DONE = "__READMETEST_DONE__"
DEPLOY = "scripts/deploy-load-balancer.sh deploy"
TEST_COMMAND = "scripts/test.sh"


@dataclass(frozen=True)
class Block:
    name: str
    code: str


def readme_blocks(text: str) -> list[Block]:
    """The marked shell blocks of the README, in order."""
    return [Block(m.group(1), m.group(3)) for m in MARK.finditer(text)]


# What each block must print (regular expressions, all must match), and how long it may take.
EXPECT: dict[str, tuple[list[str], float]] = {
    "quickstart": (
        [r"ISH Gateway is running", r"gateway +http://127\.0\.0\.1:8080/v1", r"self-signed: curl --cacert"],
        300,
    ),
    "setup": ([r"controller +running", r"nginx +running", r'\{"ok":true'], 60),
    "backends": ([], 60),
    "register": ([r"\A201\n201\n201\n\Z"], 60),
    "client-key": ([], 30),
    "chat": (
        [
            r"HTTP/1\.1 200 OK",
            r"(?i)x-request-id: walkthrough-1",
            r"(?i)x-ishgw-instance: local-[ab]",
            "Hello from",
        ],
        30,
    ),
    "weights": ([r"\d+ (?i:x-ishgw-instance): local-a"], 30),
    "sdk-openai": ([r"local-[ab] 1 Hello from local-[ab]", r"\nHello from local-[ab]"], 60),
    "sdk-anthropic": ([r"\AHello from claude-a.*\nHello from claude-a"], 60),
    "sdk-ollama": ([r"\AHello from local-[ab].*\nHello from local-[ab]"], 60),
    "ollama-curl": ([r'"done": ?true', "Hello from local-[ab]"], 30),
    "https": ([r'"object": ?"list"', r'"id": ?"llama3\.2"', r"\nHello from local-[ab]"], 60),
    "maintenance": (
        [
            r"\n200\n",
            r"plain HTTP serves the API",
            r"excluded local-b: maintenance",
            r"limits +with valid key",
        ],
        60,
    ),
    "cleanup": ([r"\A204\n204\n204\n204\n"], 60),
}


class Shell:
    """One bash in a fresh network namespace, fed one block at a time (variables carry over, as in a
    terminal). A `sleep` holds the namespace so clean-up can still reach it after bash has gone."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.env = env
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "3600"], start_new_session=True)
        self.netns = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 10
        while os.readlink(self.netns) == os.readlink("/proc/self/ns/net"):  # unshare has not run yet
            assert time.monotonic() < deadline, "unshare --net did not start"
            time.sleep(0.01)
        subprocess.run(["nsenter", f"--net={self.netns}", "ip", "link", "set", "lo", "up"], check=True)
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.netns}", "bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send("set -e\n")  # a failing command ends the block (not pipefail: `| head` is fine)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def run(self, code: str, timeout: float) -> str:
        """Run one block; its output. Fails on a non-zero status, an exit, or the time limit."""
        self.send(code if code.endswith("\n") else code + "\n")
        self.send(f"printf '\\n%s %s\\n' {DONE} $?\n")
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Short waits: background stand-ins keep the pipe open after bash has exited.
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail(f"the shell exited (a command failed; set -e):\n{''.join(output)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no end within {timeout:.0f} s; output so far:\n{''.join(output)}")
                continue
            if line is None:
                pytest.fail(f"the shell exited (a command failed; set -e):\n{''.join(output)}")
            if line.startswith(DONE):
                status = int(line.split()[1])
                assert status == 0, f"exit status {status}:\n{''.join(output)}"
                text = "".join(output)
                return text[:-1] if text.endswith("\n") else text  # the newline printf added before DONE
            output.append(line)

    def close(self, home: Path) -> None:
        """Stop whatever the blocks started, even after a failure: the gateway, then the stand-ins."""
        if self.proc.poll() is None:
            self.proc.kill()
        subprocess.run(
            ["nsenter", f"--net={self.netns}", str(ROOT / "scripts/deploy-load-balancer.sh"), "stop"],
            env={**self.env, "ISHGW_HOME": str(home)},
            capture_output=True,
            timeout=120,
            check=False,
        )
        pids = home.parent / "ishgw-walkthrough.pids"
        if pids.exists():
            for pid in pids.read_text().split():
                subprocess.run(["kill", pid], capture_output=True, check=False)
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def shell() -> Iterator[tuple[Shell, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="ishgw-readme-", dir="/tmp"))
    workdir.chmod(0o711)  # nginx workers (www-data) reach the shim sockets under home/run
    home = workdir / "home"
    env = {**base_env(), "ISHGW_HOME": str(home), "TMPDIR": str(workdir)}
    env.pop("http_proxy", None)
    env.pop("https_proxy", None)
    sh = Shell(ROOT, env)
    try:
        yield sh, home
    finally:
        sh.close(home)
        shutil.rmtree(workdir, ignore_errors=True)


def test_readme_marks_every_walkthrough_block_and_ci_runs_its_test_command() -> None:
    text = README.read_text()
    blocks = readme_blocks(text)
    assert [b.name for b in blocks] == list(EXPECT), "README blocks and the test's expectations differ"
    quickstart = blocks[0].code.splitlines()
    assert quickstart == [DEPLOY, TEST_COMMAND], "the quick start is the two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.escape(TEST_COMMAND)
    assert re.search(rf"^exec {command}$", ci, re.M), ".ci/run must run the README's test command"
    # Every bash block of the quick start and walk-through is marked (none silently skipped).
    walkthrough = text[: text.index("## Client endpoints")]
    assert walkthrough.count("```bash\n") == len(blocks)


def test_readme_quick_start_and_walkthrough_run_verbatim(shell: tuple[Shell, Path]) -> None:
    sh, _home = shell
    timings: list[str] = []
    for block in readme_blocks(README.read_text()):
        patterns, limit = EXPECT[block.name]
        # The quick start's second command is the suite itself (this test runs inside it).
        code = DEPLOY if block.name == "quickstart" else block.code
        started = time.monotonic()
        output = sh.run(code, limit)
        timings.append(f"{block.name} {time.monotonic() - started:.1f}s")
        for pattern in patterns:
            assert re.search(pattern, output, re.S), f"block {block.name!r}: no {pattern!r} in:\n{output}"
    print("README blocks:", ", ".join(timings))
