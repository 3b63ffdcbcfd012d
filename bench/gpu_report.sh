#!/usr/bin/env bash
# Run the GPU test suite and the GPU benchmark on a machine with an NVIDIA GPU and CuPy, and
# keep every log in one folder (default: gpu-report/), for docs/gpu-results.md.
#
#     bash bench/gpu_report.sh [OUTDIR]
#
# Needs: CuPy, NumPy, SciPy, numba, pytest and hypothesis importable by python3 (pytest-xdist
# is used when present). Installs diagnet itself in editable mode without touching the
# network (--no-index --no-deps), so it also works on a machine with no package registry.
# Each stage has a time limit in seconds (GPU_TESTS_TIMEOUT, PROFILE_TIMEOUT, GPU_BENCH_TIMEOUT,
# FULL_SUITE_TIMEOUT; 0 skips the whole-suite stage) so that one hang cannot eat the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu-report}
mkdir -p "$out"
py=${PYTHON:-python3}
t_tests=${GPU_TESTS_TIMEOUT:-240}
t_bench=${GPU_BENCH_TIMEOUT:-240}
t_prof=${PROFILE_TIMEOUT:-60}
t_full=${FULL_SUITE_TIMEOUT:-150}

{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$py" - <<'EOF'
import platform
import cupy, numpy, scipy
print("python", platform.python_version(), "| cupy", cupy.__version__, "| numpy", numpy.__version__,
      "| scipy", scipy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
try:
    import numba
    print("numba", numba.__version__)
except ImportError:
    print("numba missing")
EOF
} >"$out/gpu-env.txt" 2>&1
cat "$out/gpu-env.txt"

"$py" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { echo "editable install failed:"; cat "$out/install.log"; }

xdist=()
if "$py" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi

echo "== GPU-marked tests (limit ${t_tests}s)"
timeout "$t_tests" "$py" -m pytest -q -m gpu -p no:cacheprovider "${xdist[@]}" -rfEs --durations=10 \
    >"$out/gpu-tests.log" 2>&1
echo "exit $?" >>"$out/gpu-tests.log"
tail -n 40 "$out/gpu-tests.log"

echo "== launch overhead profile (limit ${t_prof}s)"
timeout "$t_prof" "$py" bench/profile_gpu_launch.py --out "$out/gpu-launch-profile.md" \
    >"$out/gpu-launch-profile.log" 2>&1
echo "exit $?" >>"$out/gpu-launch-profile.log"
tail -n 14 "$out/gpu-launch-profile.log"

echo "== benchmark (limit ${t_bench}s)"
timeout "$t_bench" "$py" bench/bench_diag_linear.py --device cuda --out "$out/gpu-benchmarks.md" \
    >"$out/gpu-bench.log" 2>&1
echo "exit $?" >>"$out/gpu-bench.log"
tail -n 8 "$out/gpu-bench.log"

if [ "$t_full" -eq 0 ]; then exit 0; fi  # FULL_SUITE_TIMEOUT=0 skips the last stage
echo "== whole suite on the GPU machine (limit ${t_full}s)"
timeout "$t_full" "$py" -m pytest -q -p no:cacheprovider "${xdist[@]}" --maxfail=40 \
    >"$out/full-suite.log" 2>&1
echo "exit $?" >>"$out/full-suite.log"
tail -n 30 "$out/full-suite.log"
