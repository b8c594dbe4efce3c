"""The README's examples stay true: its commands run as written from a fresh copy of the repository.

How README.md's fenced blocks are treated (follow this when adding a section):

- ```` ```sh ```` blocks run, in the order they appear, as one bash script (``set -euo pipefail``)
  started in the top folder of a fresh copy of the repository's tracked files (``git ls-files``),
  so a shell variable set in one block (``WRITE_KEY=...``) is there in the next, and a file the
  README uses must be committed. Call the CLI as ``.venv/bin/klaviyo-router``: the copy's ``.venv``
  is the environment running the tests (the install block is not run). Nothing reaches the
  internet: a block runs against the sandbox, a ``fake-klaviyo`` of the README, or offline. Use
  ``curl --fail-with-body`` where an HTTP error must fail the block.
- ```` ```sh background ```` blocks hold one long-running command (``serve``, ``fake-klaviyo``): it
  is started in the background, and the next block starts once its output has a line containing
  ``listening`` (60 s at most). After the last block each is stopped with SIGINT and must exit 0.
- ```` ```sh skip ```` blocks are shown, not run: installation (the tests run installed), real
  Klaviyo keys, Docker, commands with placeholders. Say in the text what they need.
- Ports ``8080`` (the router) and ``8765`` (``fake-klaviyo``) in ``sh`` blocks are replaced by free
  ports, and ``KLAVIYO_ROUTER_PORT`` is set to the router's, so the README can use the defaults
  while tests run side by side. No other ``KLAVIYO_ROUTER_*`` or ``KLAVIYO_PRIVATE_KEY`` is set.
- Other languages are not run: the first ``toml`` block is ``examples/router.toml``, the second
  the queue URL of "Running several nodes", the ``json`` block is
  ``examples/mappings/order-completed.json`` (all checked below); plain fences show output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import orjson
import pytest

from router.mapping import validate_document
from router.queue import open_queue
from router.queue.postgres import PostgresQueue
from router.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
SH_KINDS = ("sh", "sh background", "sh skip")
#: Default ports the README names → replaced by free ones in the run.
PORTS = ("8080", "8765")


def blocks(info: str | None = None) -> list[tuple[str, str]]:
    """(info string, text) of every fenced block, or of those whose info string is ``info``."""
    found = [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(README)]
    return [(i, text) for i, text in found if info is None or i == info]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fresh_copy(target: Path) -> Path:
    """The repository's tracked files (as a fresh clone has them) under ``target``."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_symlink() or source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    return target


def script(ports: dict[str, int]) -> str:
    """The README's runnable blocks as one bash script, background commands managed."""
    lines = [
        "set -euo pipefail",
        "pids=()",
        'trap \'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done\' EXIT',
        "ready() {  # $1: log file; waits for a line saying 'listening'",
        '  for _ in $(seq 600); do grep -q listening "$1" && return 0; sleep 0.1; done',
        '  echo "never ready: $1" >&2; cat "$1" >&2; return 1',
        "}",
    ]
    for n, (info, text) in enumerate(blocks()):
        if info not in ("sh", "sh background"):
            continue
        for default, port in ports.items():
            text = text.replace(default, str(port))
        lines.append(f"echo '--- README block {n}' >&2")
        if info == "sh":
            lines.append(text)
        else:
            log = f".readme-background-{n}.log"
            lines += [f"( {text.strip()} ) >{log} 2>&1 &", 'pids+=("$!")', f"ready {log}"]
    lines += [
        'for p in "${pids[@]}"; do kill -INT "$p"; wait "$p"; done',
        "pids=()",
        "echo '--- README done' >&2",
    ]
    return "\n".join(lines) + "\n"


class TestReadme:
    """Examples in README.md."""

    def test_sh_blocks_are_marked(self) -> None:
        """Every shell block says how the test treats it; the README runs something of each kind."""
        infos = [info for info, _ in blocks() if info.split()[:1] in (["sh"], ["bash"], ["shell"])]
        assert set(infos) <= set(SH_KINDS), infos
        assert {"sh", "sh background", "sh skip"} <= set(infos)

    def test_examples_run_from_a_fresh_copy(self, tmp_path: Path) -> None:
        """The ``sh`` blocks, in order, against the blocks started in the background, from a copy."""
        venv = Path(sys.prefix)
        if not (venv / "bin" / "klaviyo-router").exists():
            pytest.skip(f"klaviyo-router is not installed in {venv} (pip install -e .)")
        clone = fresh_copy(tmp_path / "clone")
        (clone / ".venv").symlink_to(venv, target_is_directory=True)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_ROUTER_", "KLAVIYO_PRIVATE"))
        }
        ports = {default: free_port() for default in PORTS}
        env["KLAVIYO_ROUTER_PORT"] = str(ports["8080"])
        text = script(ports)
        process = subprocess.Popen(
            ["bash", "-c", text],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"the README's examples did not finish\n{err[-3000:]}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == 0, f"{err[-4000:]}\n--- stdout\n{out[-2000:]}"
        assert err.rstrip().endswith("--- README done")
        # what the first-hour path promises, from its output
        assert '"path":"/api/profile-import"' in out and '{"skipped":"integrations: ' in out
        assert '{"accepted":10,"duplicates":0,"rejected":[]}' in out
        assert "profile ada@example.com: " in out and "dead letters" in out

    def test_config_block_is_the_example_config(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The README's ``toml`` block is ``examples/router.toml``, and it loads."""
        (_, example), _ = blocks("toml")
        assert example == (ROOT / "examples" / "router.toml").read_text()
        monkeypatch.setenv("WEB_WRITE_KEY", "wk_readme_0123456789")
        monkeypatch.setenv("KLAVIYO_PRIVATE_KEY", "pk")
        monkeypatch.chdir(ROOT)
        settings = Settings.load(ROOT / "examples" / "router.toml", env={})
        assert [d.name for d in settings.destinations] == ["klaviyo"]
        assert settings.destinations[0].private_key == "pk"

    def test_several_nodes_queue_url_opens_the_postgresql_queue(self) -> None:
        """The "Running several nodes" block names a PostgreSQL queue with its pool size."""
        _, (_, snippet) = blocks("toml")
        queue = open_queue(tomllib.loads(snippet)["queue"]["url"])
        assert isinstance(queue, PostgresQueue) and queue.where == "db.internal:5432/router"

    def test_mapping_block_is_the_example_mapping(self) -> None:
        """The README's ``json`` block is ``examples/mappings/order-completed.json``, a valid mapping."""
        ((_, example),) = blocks("json")
        path = ROOT / "examples" / "mappings" / "order-completed.json"
        assert example == path.read_text()
        validate_document(orjson.loads(example), "README.md")
