"""Every variant of the one-row gemv compiles to an sm_90 cubin with the installed Triton (see
sm90_compile.py): the interpreter checks what the kernels compute, this that Triton's compiler takes
them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_gemv_variants_compile_for_sm90():
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton has no ptxas")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "compiled for sm_90" in done.stdout
