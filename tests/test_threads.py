"""Thread defaults for a shared CPU (common/threads.py)."""
import os
import subprocess
import sys

from common.paths import REPO_ROOT
from common.threads import default_cpu_threads


def test_one_core_is_left_to_others():
    assert [default_cpu_threads(c) for c in (1, 2, 3, 16)] == [1, 1, 2, 15]


def _threads_after_setting(env_threads):
    code = "import torch; from common.threads import set_cpu_threads; print(set_cpu_threads('cpu'))"
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    if env_threads:
        env["OMP_NUM_THREADS"] = env_threads
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_the_default_applies_unless_omp_num_threads_says_otherwise():
    cores = os.cpu_count() or 1
    assert _threads_after_setting(None) == default_cpu_threads(cores)
    if cores >= 2:  # torch caps the count at the cores, so only a count of at most that shows
        assert _threads_after_setting(str(cores)) == cores
