"""The wheel ships canaryd only: no devkit (devstack, demo, bench); its CLI offers only commands that work there."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("canaryd-*.whl")
    return wheel


def test_wheel_holds_only_the_controller_and_its_cli_works(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert modules and all(n.startswith("canaryd/") for n in modules), modules
    assert not [n for n in names if "devstack" in n or "demo" in n or "bench" in n or n.startswith("devkit/")]
    assert "canaryd/core/decide.py" in names and "canaryd/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    py = env_dir / "bin" / "python"
    # Offline: the dependencies come from this test run's own environment via a path file.
    site = subprocess.run(
        [str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    # Without PYTHONPATH: a checkout on it (with its egg-info) would look like canaryd already installed.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=clean)
    cli = env_dir / "bin" / "canaryd"
    outside = tmp_path / "elsewhere"  # not the checkout: devkit must not be importable by accident
    outside.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(env_dir / "bin"), "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
        return subprocess.run([str(cli), *args], capture_output=True, text=True, cwd=outside, env=env)

    help_text = run("--help")
    assert help_text.returncode == 0, help_text.stderr
    listed = help_text.stdout.split("  COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    commands = [line.split()[0] for line in listed.splitlines() if line.startswith("    ") and line.split()]
    assert "devstack" not in commands and "demo" not in commands, commands
    assert {"run", "status", "check", "promote", "abort", "pause", "resume", "retry", "version"} <= set(commands)
    for command in commands:
        sub = run(command, "--help")
        assert sub.returncode == 0, f"canaryd {command} --help: {sub.stderr}"
    assert run("version").stdout.strip().startswith("canaryd ")
    # Without a cluster every command that needs one says so in one line, no traceback.
    status = run("status")
    assert status.returncode == 1 and status.stderr.startswith("error: ") and "Traceback" not in status.stderr
