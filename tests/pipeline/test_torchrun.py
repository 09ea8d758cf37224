"""Distributed runs on CPU: gloo on 127.0.0.1 through torchrun, `optg run --nproc` and a
two-node c10d rendezvous on localhost, against a one-process run of the same tiny config.

The tiny config has no BatchNorm (per-rank batch statistics would differ from the global
batch's by design), so a 2-rank run must equal the 1-rank run up to float summation order.
Every multi-process run of this module takes 30-90 s on a loaded 2-core machine: most of it is
starting 3 Python processes that import torch; the runs are shared through fixtures.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from tests.interrupt import SITE as INTERRUPT_SITE
from tests.interrupt import SPEC_ENV
from stages.io import sha256_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """\
name: tiny_dist
seed: 0
data:
  name: synthetic
  options: {shape: [4, 32], num_classes: 3, num_samples: 150}
  batch_size: 32
model: {name: cnn1d, options: {channels: 8}}
train: {epochs: 1, optimizer: {lr: 0.05}}
sparsity: {method: optg, target: 0.8, train: {epochs: 2, optimizer: {lr: 0.05}}}
validate: {max_accuracy_drop: 0.9}
export: {enabled: false}
verify: {enabled: false}
"""

# Installed in every process of a guarded run: a rank other than 0 that creates, writes,
# renames or removes anything under OPTG_TEST_GUARD_DIR fails on the spot.
GUARD = textwrap.dedent('''
    import os, sys
    _rank = os.environ.get("RANK")
    if _rank not in (None, "0") and os.environ.get("OPTG_TEST_GUARD_DIR"):
        _root = os.path.realpath(os.environ["OPTG_TEST_GUARD_DIR"])
        _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _inside(path):
            try:
                return os.path.realpath(os.fsdecode(path)).startswith(_root)
            except (TypeError, ValueError):
                return False

        def _guard(event, args):
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _writes)
                paths = [path] if writing else []
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree",
                           "os.truncate", "os.symlink", "os.link", "os.chmod"):
                paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            else:
                return
            for p in paths:
                if _inside(p):
                    raise PermissionError(f"rank {_rank} wrote into the run directory: {event} {p}")

        sys.addaudithook(_guard)
''')


def _env(tmp: Path, guard_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (SPEC_ENV, "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GUARD + "\n" + INTERRUPT_SITE)  # the guard and the tests' interrupts
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", OPTG_DIST_TIMEOUT="60")
    if guard_dir is not None:
        env["OPTG_TEST_GUARD_DIR"] = str(guard_dir)
    env.update(extra)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--max-restarts=0", "--monitor-interval=1", *args,
            "-m", "pipeline.cli", "run"]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One config, run once in one process and once as 2 ranks through torchrun with rank 1
    forbidden to write into the run directory."""
    tmp = tmp_path_factory.mktemp("torchrun")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(CONFIG)
    one, two = tmp / "one", tmp / "two"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--out", str(one), "--quiet"],
                   check=True, env=_env(tmp), cwd=tmp, timeout=300)
    proc = subprocess.run([*_torchrun("--standalone", "--nproc-per-node=2"), str(cfg), "--out", str(two), "--quiet"],
                          env=_env(tmp, guard_dir=two), cwd=tmp, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg, "one": one, "two": two}


def test_write_guard_stops_a_nonzero_rank_writing(tmp_path):
    """The guard used below really fails a rank-1 process that writes into the directory."""
    target = tmp_path / "run"
    target.mkdir()
    code = f"open({str(target / 'x')!r}, 'w').write('x')"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, guard_dir=target, RANK="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "rank 1 wrote into the run directory" in proc.stderr
    assert not (target / "x").exists()


def test_two_ranks_equal_one_process(runs):
    one, two = _manifest(runs["one"]), _manifest(runs["two"])
    assert one["status"] == two["status"] == "succeeded"
    assert one["distributed"] == {"world_size": 1, "backend": None, "nnodes": 1}
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "nnodes": 1}
    assert _files(runs["one"]) == _files(runs["two"])  # same layout; rank 1 wrote nothing (guard)
    for key in ("dense_accuracy", "sparse_accuracy", "targeted_sparsity"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    assert len(one["history"]) == len(two["history"]) == 3
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_accuracy"] == a["train_accuracy"] and b["val_accuracy"] == a["val_accuracy"]
        assert a["samples_per_second"] > 0 and b["samples_per_second"] > 0
    w1, w2 = load_file(str(runs["one"] / "model.safetensors")), load_file(str(runs["two"] / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:  # DDP's average of loss-weighted shard gradients == the global-batch gradient
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(w1[name] == 0, w2[name] == 0) or name.endswith("bias"), name  # same masks


def test_killed_rank_ends_the_job_and_the_same_command_resumes(runs):
    tmp, cfg = runs["tmp"], runs["cfg"]
    out = tmp / "killed"
    command = [*_torchrun("--standalone", "--nproc-per-node=2"), str(cfg), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(command, env=_env(tmp, **{SPEC_ENV: "sparse:1:2:KILL:1"}), cwd=tmp,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    killed_at, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        if "sending SIGKILL at sparse epoch 1 step 2" in line:
            killed_at = time.monotonic()
    code = proc.wait(timeout=120)
    assert killed_at is not None, "".join(lines)[-3000:]
    assert code != 0
    assert time.monotonic() - killed_at < 60  # bounded: no rank hangs on the dead one
    manifest = _manifest(out)
    assert manifest["status"] in ("failed", "interrupted") and manifest["stages"]["sparsify"]["status"] == "failed"
    assert not (out / "model.safetensors").exists()

    subprocess.run(command, check=True, env=_env(tmp), cwd=tmp, timeout=300, capture_output=True)
    manifest = _manifest(out)
    assert manifest["status"] == "succeeded" and manifest["resumed"] == 1
    assert sha256_file(out / "model.safetensors") == sha256_file(runs["two"] / "model.safetensors")


def test_nproc_launcher_ctrl_c_exits_130_and_resumes(runs):
    """Ctrl-C reaches every process of the foreground group; the tests' interrupt hook sends SIGINT to
    both ranks after the same step, which is what a terminal does to them."""
    tmp, cfg = runs["tmp"], runs["cfg"]
    out = tmp / "nproc"
    command = [sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--out", str(out), "--quiet", "--nproc", "2"]
    proc = subprocess.run(command, env=_env(tmp, **{SPEC_ENV: "sparse:2:1:INT"}), cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert _manifest(out)["status"] == "interrupted"
    proc = subprocess.run(command, env=_env(tmp), cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _manifest(out)
    assert manifest["status"] == "succeeded" and manifest["distributed"]["world_size"] == 2
    assert sha256_file(out / "model.safetensors") == sha256_file(runs["two"] / "model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_localhost_with_c10d_rendezvous(runs):
    tmp, cfg = runs["tmp"], runs["cfg"]
    out = tmp / "nodes"
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=optg-test"]
    nodes = [subprocess.Popen([*_torchrun(*rdzv), str(cfg), "--out", str(out), "--quiet"], env=_env(tmp),
                              cwd=tmp, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(n.wait(timeout=300), n.communicate()[1]) for n in nodes]
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    manifest = _manifest(out)
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo", "nnodes": 2}
    assert sha256_file(out / "model.safetensors") == sha256_file(runs["two"] / "model.safetensors")


def test_batch_not_divisible_by_the_processes_is_a_config_error(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--nproc", "3"]) == 2
    assert "not divisible by the 3 processes" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "5")  # as torchrun would set it
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    assert "not divisible by the 5 processes" in capsys.readouterr().err
    assert not out.exists()  # found before anything was written or launched


def test_structured_under_several_processes_is_a_config_error(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG + "structured: {ratio: 0.5}\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--nproc", "2"]) == 2
    assert "structured: channel pruning runs in one process" in capsys.readouterr().err
    assert not out.exists()


def test_interrupt_hook_rank_selects_one_process(monkeypatch):
    from tests.interrupt import signal_hook

    monkeypatch.setenv("RANK", "0")
    assert signal_hook("sparse:1:2:KILL:1") is None  # meant for rank 1 only
    assert signal_hook("sparse:1:2:KILL") is not None  # no rank: every process
    monkeypatch.setenv("RANK", "1")
    assert signal_hook("sparse:1:2:KILL:1") is not None
    with pytest.raises(ValueError, match="PHASE:EPOCH:STEP"):
        signal_hook("sparse:1:2:KILL:1:extra")
