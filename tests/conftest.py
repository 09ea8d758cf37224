"""Suite-wide: the tests run on the CPU even where CUDA is present.

Many tests compare runs bit for bit (resume equals an uninterrupted run, 2 ranks equal 1
process, masks equal across ranks) and use `device: auto`, which would pick CUDA on a GPU
machine, where kernels need not be deterministic. Hiding the GPUs before torch initialises CUDA
pins every test, and every `optg` subprocess a test starts (they inherit the environment), to
the CPU. Set `OPTG_TEST_CUDA=1` to run the suite with the GPUs visible (tests that compare
bitwise may then fail for nondeterminism, not for a bug).
"""
from __future__ import annotations

import os

if os.environ.get("OPTG_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
