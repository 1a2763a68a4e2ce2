"""scripts/setup.sh on a machine without apt-get, sudo or a browser, and CI's skip rule (.ci/check_skips.py).

setup.sh runs in a copy of its inputs (pyproject.toml, scripts/) with a PATH holding only a few basic tools, and a
stand-in .venv: a real venv of this Python, without packages (pip itself is linked in), whose `python -m pip install`
is recorded instead of run, so no test installs anything or needs a network. A few seconds in all."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pip
import pytest

REPO = Path(__file__).resolve().parents[1]
# The tools the scripts may use; no apt-get, sudo, chromium or chromedriver, and no sha256sum (macOS lacks it).
TOOLS = ["bash", "sh", "env", "cat", "dirname", "basename", "id", "uname", "grep", "sed", "tr", "head", "mkdir", "rm"]
BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@dataclass
class Sandbox:
    root: Path  # the repo copy
    bin: Path  # the only folder on PATH
    pip_log: Path

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PIP_", "PERSONA_AXIS_CHROM")) and k not in ("CI", "PYTHON", "VIRTUAL_ENV")}
        # No pip config files, so pip's sources are only what a test sets through PIP_* variables.
        full = {**base, "PATH": str(self.bin), "PIP_CONFIG_FILE": os.devnull, "PYTHON": BASE_PYTHON, **env}
        return subprocess.run([str(self.bin / "bash"), "scripts/setup.sh", *args], cwd=self.root, env=full,
                              capture_output=True, text=True, timeout=120)

    def pip_calls(self) -> list[str]:
        return self.pip_log.read_text().splitlines() if self.pip_log.exists() else []


def _stand_in_venv(venv: Path, pip_log: Path) -> None:
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "pip").symlink_to(Path(pip.__file__).parent)
    python = venv / "bin" / "python"
    python.unlink()
    python.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1 $2 $3" = "-m pip install" ]; then printf '%s\\n' "$*" >> '{pip_log}'; exit 0; fi
        exec '{venv / "bin" / version}' "$@"
        """))
    python.chmod(0o755)


@pytest.fixture()
def sandbox(tmp_path: Path) -> Sandbox:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "pyproject.toml", root)
    for script in ("setup.sh", "install-browser.sh"):
        shutil.copy2(REPO / "scripts" / script, root / "scripts")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    box = Sandbox(root, tools, tmp_path / "pip-calls.txt")
    _stand_in_venv(root / ".venv", box.pip_log)
    for hidden in ("apt-get", "sudo", "chromium", "chromium-browser", "chromedriver"):
        assert shutil.which(hidden, path=str(tools)) is None
    return box


def _executable(path: Path) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def _cpu_wheel_name() -> str:
    """A file name pip would take as torch 2.13.0's CPU build for this Python and machine."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    machine = platform.machine().lower()
    if platform.system() == "Darwin":
        return f"torch-2.13.0-{tag}-none-macosx_11_0_{machine}.whl"
    return f"torch-2.13.0+cpu-{tag}-{tag}-manylinux_2_28_{machine}.whl"


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def test_without_apt_sudo_or_browser_setup_ends_0_with_one_line_about_the_browser(sandbox: Sandbox,
                                                                                  tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / _cpu_wheel_name()).write_bytes(b"")
    first = sandbox.run(PIP_FIND_LINKS=str(wheels))
    assert first.returncode == 0, first.stderr
    browser = [line for line in _lines(first) if "chrom" in line]
    assert len(browser) == 1
    assert "chromedriver" in browser[0] and "scripts/install-browser.sh" in browser[0]
    installs = sandbox.pip_calls()
    assert installs and (sandbox.root / ".venv" / ".persona-axis-installed").is_file()

    again = sandbox.run(PIP_FIND_LINKS=str(wheels))  # installed: pip is not called again, the note stays
    assert again.returncode == 0, again.stderr
    assert _lines(again) == browser
    assert sandbox.pip_calls() == installs


@pytest.mark.parametrize("how", ["path", "env"])
def test_a_browser_on_path_or_named_by_env_gets_no_note(sandbox: Sandbox, tmp_path: Path, how: str) -> None:
    if how == "path":
        env = {}
        _executable(sandbox.bin / "chromium")
        _executable(sandbox.bin / "chromedriver")
    else:
        env = {"PERSONA_AXIS_CHROMIUM": _executable(tmp_path / "Chromium"),
               "PERSONA_AXIS_CHROMEDRIVER": _executable(tmp_path / "driver")}
    sandbox.run(**env)
    result = sandbox.run(**env)  # the second run: installed, so only notes would print
    assert result.returncode == 0, result.stderr
    assert _lines(result) == []


def test_pip_is_quiet_unless_asked_with_v(sandbox: Sandbox) -> None:
    assert sandbox.run().returncode == 0
    quiet = sandbox.pip_calls()
    assert len(quiet) >= 5 and all(" -qq " in f" {call} " for call in quiet)
    (sandbox.root / ".venv" / ".persona-axis-installed").unlink()
    sandbox.pip_log.unlink()
    assert sandbox.run("-v").returncode == 0
    assert sandbox.pip_calls() == [call.replace(" -qq", "") for call in quiet]


def test_says_in_one_line_how_torch_comes_without_a_cpu_build_at_hand(sandbox: Sandbox) -> None:
    result = sandbox.run()
    assert result.returncode == 0, result.stderr
    torch = [line for line in _lines(result) if "torch" in line]
    assert len(torch) == 1 and "2.13.0" in torch[0]
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "CUDA" in torch[0] and "GB" in torch[0] and "PIP_EXTRA_INDEX_URL" in torch[0]


def test_says_so_when_local_wheels_hold_no_cpu_build_for_this_python(sandbox: Sandbox, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    other_python = f"cp{sys.version_info.major}{sys.version_info.minor + 1}"
    for name in (_cpu_wheel_name().replace("2.13.0", "2.12.0"), _cpu_wheel_name().replace(tag, other_python),
                 f"torch-2.13.0-{tag}-{tag}-manylinux_2_28_{platform.machine().lower()}.whl"):  # unlabelled: CUDA
        (wheels / name).write_bytes(b"")
    result = sandbox.run(PIP_FIND_LINKS=str(wheels))
    assert result.returncode == 0, result.stderr
    torch = [line for line in _lines(result) if "torch" in line]
    assert len(torch) == 1 and "no CPU build" in torch[0]


@pytest.mark.parametrize("source", ["find-links folder", "file index"])
def test_names_the_local_cpu_build_it_uses(sandbox: Sandbox, tmp_path: Path, source: str) -> None:
    if source == "find-links folder":
        where = tmp_path / "wheels"
        where.mkdir()
        (where / _cpu_wheel_name()).write_bytes(b"")
        (where / "numpy-2.0.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
        env = {"PIP_FIND_LINKS": str(where)}
    else:
        where = tmp_path / "simple"
        (where / "torch").mkdir(parents=True)
        (where / "torch" / "index.html").write_text(f'<a href="../../files/{_cpu_wheel_name()}#sha256=00">x</a>')
        env = {"PIP_INDEX_URL": where.as_uri()}
    result = sandbox.run(**env)
    assert result.returncode == 0, result.stderr
    torch = [line for line in _lines(result) if "torch" in line]
    assert len(torch) == 1 and "CPU build" in torch[0] and str(where) in torch[0] and "CUDA" not in torch[0]


def test_no_note_when_the_venv_has_a_cpu_torch(sandbox: Sandbox) -> None:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = sandbox.root / ".venv" / "lib" / version / "site-packages"
    (site / "torch").mkdir()
    (site / "torch" / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    (site / "torch-2.13.0+cpu.dist-info").mkdir()
    (site / "torch-2.13.0+cpu.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
    result = sandbox.run()
    assert result.returncode == 0, result.stderr
    assert not [line for line in _lines(result) if "torch" in line]


def test_install_browser_fails_in_one_line_where_it_cannot_install(sandbox: Sandbox) -> None:
    def install_browser() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(sandbox.bin / "bash"), "scripts/install-browser.sh"], cwd=sandbox.root,
                              env={"PATH": str(sandbox.bin)}, capture_output=True, text=True, timeout=60)

    missing = install_browser()  # no browser and no apt-get: CI's call of it must fail
    assert missing.returncode == 1 and len(_lines(missing)) == 1 and "apt-get" in missing.stderr
    _executable(sandbox.bin / "chromium")
    _executable(sandbox.bin / "chromedriver")
    present = install_browser()
    assert (present.returncode, present.stdout, present.stderr) == (0, "", "")


@pytest.mark.parametrize("python", ["3.10", "missing"])
def test_an_old_or_missing_python_is_one_line_and_a_failure(sandbox: Sandbox, tmp_path: Path, python: str) -> None:
    shutil.rmtree(sandbox.root / ".venv")
    fake = tmp_path / "python3"
    if python == "3.10":  # answers like a Python 3.10 would: `--version`, and whatever it is asked to print
        fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.10.14"; else echo 3.10; fi\n')
        fake.chmod(0o755)
    result = sandbox.run(PYTHON=str(fake))
    assert result.returncode != 0
    lines = _lines(result)
    assert len(lines) == 1 and "3.11" in lines[0] and str(fake) in lines[0], lines
    if python == "3.10":
        assert "3.10" in lines[0]
    assert not (sandbox.root / ".venv").exists()


# CI's skip rule: a tiny pytest run with an allowed skip, an unexpected one and a module skipped at collection.
SKIPPING_TESTS = {
    "tests/test_peer.py": "import pytest\n\ndef test_ok():\n    pass\n\ndef test_optional():\n    pytest.skip('no peer')\n",
    "tests/test_other.py": ("import pytest\n\n@pytest.mark.parametrize('x', [1, 2])\ndef test_p(x):\n"
                            "    if x == 2:\n        pytest.skip('unexpected')\n"),
    "tests/test_module.py": "import pytest\n\nnope = pytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n",
}


@pytest.fixture(scope="module")
def junit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("skips")
    for name, text in SKIPPING_TESTS.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    junit = root / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"],
                   cwd=root, capture_output=True, text=True, timeout=120)
    return junit


def _check_skips(junit: Path, tmp_path: Path, allowed: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "allowed").write_text(allowed)
    return subprocess.run([sys.executable, str(REPO / ".ci" / "check_skips.py"), str(junit), str(tmp_path / "allowed")],
                          capture_output=True, text=True, timeout=60)


def test_ci_fails_on_skips_not_in_the_allow_list(junit: Path, tmp_path: Path) -> None:
    result = _check_skips(junit, tmp_path, "# comment\ntests/test_peer.py::test_optional\n")
    assert result.returncode == 1
    named = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert named == ["tests.test_module: collection skipped", "tests.test_other::test_p[2]: unexpected"]


def test_ci_passes_when_every_skip_is_allowed(junit: Path, tmp_path: Path) -> None:
    everything = "tests/test_peer.py::test_optional\ntests/test_other.py::test_p[2]\ntests/test_module.py\n"
    result = _check_skips(junit, tmp_path, everything)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert _check_skips(junit, tmp_path, "tests/test_other.py\ntests/test_module.py\n").returncode == 1


def test_the_allow_list_names_only_the_tests_that_need_llama_cpp() -> None:
    """Both need llama-cpp-python, which only scripts/install-bench-extras.sh builds; nothing else may skip."""
    allowed = (REPO / ".ci" / "allowed-skips").read_text()
    assert [line.split("#")[0].strip() for line in allowed.splitlines() if line and not line.startswith("#")] == [
        "tests/test_llamacpp_peer.py::test_peer_decodes_the_embedded_gguf_like_our_model",
        "tests/test_export.py::test_llama_cpp_steers_with_the_exported_vector"]


@pytest.mark.parametrize(("tests", "status", "says"), [
    ({"tests/test_peer.py": SKIPPING_TESTS["tests/test_peer.py"]}, 0, ""),
    (SKIPPING_TESTS, 1, "tests.test_other::test_p[2]: unexpected"),
    ({"tests/test_fail.py": "def test_fails():\n    assert False\n"}, 1, ""),
    ({"tests/test_none.py": "x = 1\n"}, 1, "pytest collected no tests"),
])
def test_ci_run_fails_on_unexpected_skips_failures_and_no_tests(tmp_path: Path, tests: dict[str, str], status: int,
                                                                 says: str) -> None:
    """.ci/run itself, with set-up, browser, ruff and mypy stubbed out and pytest run on a few tiny tests."""
    (tmp_path / ".ci").mkdir()
    for name in ("run", "check_skips.py"):
        shutil.copy2(REPO / ".ci" / name, tmp_path / ".ci")
    (tmp_path / ".ci" / "allowed-skips").write_text("tests/test_peer.py::test_optional\n")
    (tmp_path / "scripts").mkdir()
    for stub in ("scripts/setup.sh", "scripts/install-browser.sh", ".venv/bin/ruff", ".venv/bin/mypy"):
        (tmp_path / stub).parent.mkdir(parents=True, exist_ok=True)
        _executable(tmp_path / stub)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexec '{sys.executable}' \"$@\"\n")
    python.chmod(0o755)
    for name, text in tests.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == status, result.stdout + result.stderr
    assert says in result.stderr


def test_the_dashboard_test_skips_without_a_browser_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    import test_dashboard

    monkeypatch.setenv("PATH", str(tmp_path))
    for name in ("PERSONA_AXIS_CHROMIUM", "PERSONA_AXIS_CHROMEDRIVER", "CI"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        test_dashboard.browser_paths()
    assert "\n" not in str(skipped.value) and "chromedriver" in str(skipped.value)
    assert "scripts/install-browser.sh" in str(skipped.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(BaseException) as failed:  # BaseException: a skip would be caught here too, and be wrong
        test_dashboard.browser_paths()
    assert failed.type is pytest.fail.Exception
    monkeypatch.setenv("PERSONA_AXIS_CHROMIUM", _executable(tmp_path / "Chromium"))
    monkeypatch.setenv("PERSONA_AXIS_CHROMEDRIVER", _executable(tmp_path / "driver"))
    assert test_dashboard.browser_paths() == (str(tmp_path / "Chromium"), str(tmp_path / "driver"))
