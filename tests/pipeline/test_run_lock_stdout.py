"""One run per directory (an flock held for the run's life, freed when its holder dies) and a
clean stdout (only the JSON summary, whatever a plugin prints), with real processes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.pipeline.conftest import TINY, write_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _optg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def test_a_locked_run_directory_is_refused_and_a_dead_holders_lock_is_free(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from pipeline.rundir import RunDir; "
         f"RunDir(Path({str(out)!r})).lock(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = _optg("run", str(config), "--out", str(out), "--quiet")
        assert busy.returncode == 2, busy.stderr
        assert f"in use by another optg run (pid {holder.pid}, started " in busy.stderr
        assert not out.exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = _optg("run", str(config), "--out", str(out), "--quiet")  # the kernel dropped the dead holder's lock
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "succeeded"


def test_stdout_is_the_json_summary_alone_when_a_plugin_prints(tmp_path):
    (tmp_path / "noisy_models.py").write_text(
        "import os\nfrom torch import nn\n\n"
        "def make(input_shape, num_classes):\n"
        "    print('building the model: hello from the plugin')\n"
        "    os.write(1, b'raw bytes on fd 1\\n')\n"
        "    c = input_shape[0]\n"
        "    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(8 * input_shape[1] * input_shape[2], num_classes))\n")
    config = write_config(tmp_path / "noisy.yaml", {**TINY, "model": {"name": "noisy_models:make"}})
    proc = _optg("run", str(config), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # nothing else on stdout
    assert summary["status"] == "succeeded"
    assert "hello from the plugin" in proc.stderr and "raw bytes on fd 1" in proc.stderr
