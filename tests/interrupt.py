"""Deterministic interrupts for the resume and fault tests, injected by the tests (the product
has no debug switch): a step hook that sends the process a signal after one exact training step.

In process: `main([...], on_step=signal_hook("sparse:3:5:KILL"))`. In a subprocess (`optg run`,
`python -m pipeline.cli`, torchrun's ranks): `interrupt_env(tmp, "sparse:3:5:KILL")` gives an
environment whose `sitecustomize` installs the hook as every `Runner`'s default `on_step`.

SPEC is PHASE:EPOCH:STEP[:SIGNAL[:RANK]]: after training step STEP of epoch EPOCH (both 1-based)
of PHASE (dense, sparse, or structured-N: the fine-tune after structured pruning step N), the
process sends itself SIGNAL (INT, the default, behaves like Ctrl-C; KILL like a hard kill);
with RANK, only the torchrun process of that rank does.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

SPEC_ENV = "OPTG_TEST_INTERRUPT_AT"
ROOT = Path(__file__).resolve().parents[1]
SITE = '''import os
if os.environ.get("OPTG_TEST_INTERRUPT_AT"):
    import tests.interrupt
    tests.interrupt.install_from_env()
'''


def signal_hook(spec: str) -> Any:
    """The step hook for SPEC (module docstring), or None for another rank's process.
    Raises ValueError naming the expected form."""
    parts = spec.split(":")
    try:
        phase, epoch, step = parts[0], int(parts[1]), int(parts[2])
        sig = signal.Signals[f"SIG{parts[3] if len(parts) > 3 else 'INT'}"]
        only_rank = int(parts[4]) if len(parts) > 4 else None
        known = phase in ("dense", "sparse") or re.fullmatch(r"structured-[1-9][0-9]*", phase)
        if len(parts) > 5 or not known or epoch < 1 or step < 1:
            raise ValueError(spec)
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"{spec!r}: expected PHASE:EPOCH:STEP[:SIGNAL[:RANK]], e.g. sparse:3:5:INT "
                         "(phase dense, sparse or structured-N, epoch and step from 1)") from None
    if only_rank is not None and only_rank != int(os.environ.get("RANK", "0")):
        return None

    def hook(trainer: Any, at_epoch: int, at_step: int) -> None:
        if (trainer.phase, at_epoch, at_step) == (phase, epoch, step):
            print(f"[test] interrupt: sending {sig.name} at {phase} epoch {epoch} step {step}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), sig)
    return hook


def install_from_env() -> None:
    """Make `signal_hook($OPTG_TEST_INTERRUPT_AT)` every Runner's `on_step` in this process."""
    hook = signal_hook(os.environ[SPEC_ENV])
    if hook is None:
        return
    from pipeline import runner

    original = runner.Runner.__init__

    def init(self: Any, cfg: Any, options: Any, *args: Any, **kwargs: Any) -> None:
        options.on_step = options.on_step or hook
        original(self, cfg, options, *args, **kwargs)

    runner.Runner.__init__ = init  # type: ignore[method-assign]


def interrupt_env(tmp: Path, spec: str | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a subprocess interrupted at `spec` (None: not
    interrupted): a `sitecustomize` under `tmp` that installs the hook, on PYTHONPATH."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k != SPEC_ENV}
    site = Path(tmp) / "interrupt-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), out.get("PYTHONPATH", "")) if p)
    if spec is not None:
        out[SPEC_ENV] = spec
    return out
