"""The Dockerfile's install and entry point, run without a Docker engine.

The test reads the Dockerfile, copies what its ``COPY`` lines copy, installs that the way its ``RUN``
does (``pip install .``: a built wheel, not an editable install; ``--no-deps --target``, the
dependencies coming from the test's environment), and runs ``ENTRYPOINT`` + ``CMD`` with its
``ENV``, from an empty working folder, with ``KLAVIYO_ROUTER_DATA_DIR`` pointing at a folder that
stands for the host's bind-mounted ``/data`` (and port 0 for 8080). From the host side it then
checks what the image promises: the write key is in that folder, an event sent with it reaches
the sandbox, ``GET /sandbox/state`` shows it on the router's port, the sandbox's journal is in the
folder, and a second run of the image (``klaviyo-router sandbox``) reads it back.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def dockerfile() -> dict[str, Any]:
    """The parts the test uses: ENV, COPY sources, the pip install command, ENTRYPOINT, CMD."""
    parsed: dict[str, Any] = {"env": {}, "copy": []}
    for word, rest in instructions():
        if word == "ENV":
            parsed["env"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif word == "COPY":
            parsed["copy"].extend(rest.split()[:-1])
        elif word == "RUN" and "pip install" in rest:
            parsed["pip"] = rest.split("&&")[0].split()
        elif word in ("ENTRYPOINT", "CMD"):
            parsed[word.lower()] = json.loads(rest)
    return parsed


def install(target: Path, app: Path, pip_command: list[str]) -> None:
    """``pip install .`` (or ``'.[extras]'``) of ``app`` as the image's RUN does, into ``target``
    (dependencies, the extras' too, left out)."""
    project = pip_command[-1].strip("'\"")
    assert pip_command[:2] == ["pip", "install"] and re.fullmatch(r"\.(\[[\w,]+\])?", project), pip_command
    options = [o for o in pip_command[2:-1] if o != "--no-cache-dir"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            *options,
            "--no-deps",
            "--target",
            str(target),
            str(app) + project[1:],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, body: Any, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


def wait_for_event(url: str) -> dict[str, Any]:
    for _ in range(400):
        state: dict[str, Any] = get(url + "/sandbox/state")
        if state["events"]:
            return state
        time.sleep(0.05)
    raise AssertionError(f"nothing reached the sandbox: {state}")


def build(tmp_path: Path, spec: dict[str, Any]) -> Path:
    """The COPY lines' files in ``tmp_path/app``, installed as the RUN line does into ``tmp_path/site``."""
    app = tmp_path / "app"
    app.mkdir()
    for source in spec["copy"]:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, app / source, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, app / source)
    site = tmp_path / "site"
    install(site, app, spec["pip"])
    return site


def test_image_install_and_entry_point(tmp_path: Path) -> None:
    """Installed as the image installs it, run as the image runs it, seen from the host."""
    spec = dockerfile()
    assert (
        spec["env"]["KLAVIYO_ROUTER_DATA_DIR"] == "/data" and spec["env"]["KLAVIYO_ROUTER_HOST"] == "0.0.0.0"
    )
    site = build(tmp_path, spec)
    host_data = tmp_path / "host-data"  # what `-v "$PWD/data:/data"` mounts
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_ROUTER_", "KLAVIYO_PRIVATE"))}
    env |= spec["env"]
    env |= {"KLAVIYO_ROUTER_DATA_DIR": str(host_data), "KLAVIYO_ROUTER_PORT": "0", "PYTHONPATH": str(site)}
    command = [str(site / "bin" / spec["entrypoint"][0]), *spec["entrypoint"][1:]]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=60
        )

    where = subprocess.run(
        [sys.executable, "-c", "import router; print(router.__file__)"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), where  # the installed copy runs, not the checkout

    with subprocess.Popen(
        [*command, *spec["cmd"]],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        assert process.stdout is not None
        try:
            banner = ""
            while "what it received" not in banner:
                line = process.stdout.readline()
                assert line, f"the entry point exited before its banner was out: {banner}"
                banner += line
            port = re.search(r"listening on http://[^:]+:(\d+)", banner)
            assert port is not None
            url = f"http://127.0.0.1:{port.group(1)}"
            key = (host_data / "write_key").read_text().strip()  # the write key, from the host
            assert f"write key of source default: {key}" in banner
            auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
            event = {
                "userId": "u1",
                "event": "Signed Up",
                "context": {"traits": {"email": "ada@example.com"}},
            }
            assert post(url + "/v1/track", event, auth | {"Content-Type": "application/json"}) == 200
            state = wait_for_event(url)
            assert state["events"][0]["metric"] == "Signed Up"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert (host_data / "sandbox.ndjson").exists() and (host_data / "queue.db").exists()

    listing = run("sandbox")
    assert listing.returncode == 0, listing.stderr
    assert "event   'Signed Up' of ada@example.com" in listing.stdout
    mappings = run("check-mappings")
    assert mappings.returncode == 0, mappings.stderr
    assert f"{site}/router/builtin_mappings/klaviyo/profile.json" in mappings.stdout


def test_data_folder_is_writable_by_any_user() -> None:
    """The image's /data is made world-writable (sticky): the container may run as the host user."""
    run = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "chmod 1777 /data" in run
    assert ("VOLUME", "/data") in instructions()
