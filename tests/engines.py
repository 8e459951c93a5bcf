"""Engines nobody here wrote, each in its own virtual environment under the cache (``utils.files.cache_dir``), made
from the package registry on first use: transformers 4.57 and llama.cpp (``llama-cpp-python``, compiled from its
source distribution for this CPU). The pins are in ``tests/engines/<name>.txt``; the environment's folder name carries
a digest of the pins, the build settings, the Python version and the CPU's flags (llama.cpp is compiled with
``-march=native``), so a change of any of them makes a new one. A file lock lets two test workers share one build."""

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from utils.files import cache_dir

ROOT = Path(__file__).resolve().parents[1]
# name -> (pins file, build environment). llama.cpp: llama-cpp-python's multimodal library (mtmd) is left out, a
# third of the compile that no test uses.
ENGINES = {"transformers-4": ("transformers-4.txt", {}),
           "llama.cpp": ("llama-cpp.txt", {"CMAKE_ARGS": "-DLLAVA_BUILD=OFF"})}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def engine_python(name: str) -> Path:
    """The ``python`` of the ``name`` engine's environment (built now if missing; minutes for llama.cpp)."""
    pins_file, build_env = ENGINES[name]
    pins = ROOT / "tests" / "engines" / pins_file
    key = hashlib.sha256(pins.read_bytes() + repr(sorted(build_env.items())).encode() + sys.version.encode()
                         + _cpu_flags().encode()).hexdigest()[:12]
    root = cache_dir() / "engines"
    venv = root / f"{name}-{key}"
    done = venv / ".installed"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(venv, ignore_errors=True)  # a build cut off earlier
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            # --no-cache-dir: a wheel compiled for another CPU must not come back from pip's cache
            env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), **build_env}
            r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", "-r", str(pins)],
                               env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"installing {pins.name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            done.touch()
    return venv / "bin" / "python"
