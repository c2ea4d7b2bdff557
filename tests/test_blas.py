"""qwen_mlx._blas: OpenBLAS for MLX's CPU matmuls, in either import order (fresh interpreters).

MLX binds its cblas symbols when `mlx.core` is imported, so OpenBLAS must be in the global symbol
scope by then: `import qwen_mlx` first loads it; `import mlx.core` first cannot be repaired later,
and must say so once, with the fix; LD_PRELOAD works in any order. Which library provides
`cblas_sgemm` to the process is read with dlsym/dladdr (`_blas.global_cblas`), not timed.
"""

import os
import subprocess
import sys

import pytest

from qwen_mlx import _blas

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS loading is Linux-only (macOS: Accelerate)")
OPENBLAS = _blas._available()  # None when the machine has no OpenBLAS (then there is nothing to warn about)

PROBE = """
import warnings
warnings.simplefilter("default")
{imports}
import qwen_mlx.perplexity, qwen_mlx.parity, qwen_mlx.generation  # more importers of _blas: still one warning
from qwen_mlx import _blas
print("BLAS:", _blas.blas_name())
print("PROVIDER:", _blas.global_cblas())
"""


def run(imports, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("QWEN_MLX_BLAS", "LD_PRELOAD")}
    r = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                       timeout=300, env={**e, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    return out, [line for line in r.stderr.splitlines() if "SlowBLASWarning" in line]


def test_mlx_core_first_warns_once_with_the_fix():
    out, warned = run("import mlx.core as mx\nimport qwen_mlx")
    assert out["BLAS"] == "MLX's bundled reference BLAS" and out["PROVIDER"] == "None"
    if OPENBLAS is None:
        assert warned == []
        return
    assert len(warned) == 1, warned
    assert "import qwen_mlx before mlx.core" in warned[0] and f"LD_PRELOAD={OPENBLAS}" in warned[0]


def test_qwen_mlx_first_loads_openblas_silently():
    out, warned = run("import qwen_mlx\nimport mlx.core as mx")
    assert warned == []
    if OPENBLAS is not None:
        assert out["BLAS"].startswith("OpenBLAS") and "openblas" in os.path.basename(out["PROVIDER"])


@pytest.mark.skipif(OPENBLAS is None, reason="no OpenBLAS on this machine to preload")
def test_ld_preload_works_in_either_order():
    out, warned = run("import mlx.core as mx\nimport qwen_mlx", LD_PRELOAD=OPENBLAS)
    assert warned == [] and out["BLAS"].startswith("OpenBLAS") and "openblas" in os.path.basename(out["PROVIDER"])


def test_opt_out_is_silent():
    out, warned = run("import mlx.core as mx\nimport qwen_mlx", QWEN_MLX_BLAS="none")
    assert warned == [] and out["BLAS"] == "MLX's bundled reference BLAS"
