"""SIMT emulation of diagnet's CUDA kernels on the CPU, and a CuPy stand-in that drives it.

* ``harness.cpp`` + ``cuda_shim.h``: a C++ driver that #includes the real
  ``kernels/diag_linear.cu`` and runs one kernel launch with one std::thread per CUDA thread.
* `simt.harness`: builds that driver with g++ (once per set of ``-D`` options and sanitizer
  flavor) and runs launches through it.
* `simt.fake_cupy` / `simt.fake_cupyx`: stand-ins for the ``cupy`` and ``cupyx`` modules whose
  arrays wrap NumPy arrays and whose ``RawModule`` kernels run in the harness. ``pytest
  --fake-cupy`` installs them as ``cupy``/``cupyx`` so that the GPU code path of diagnet runs
  in CI on machines without a GPU.
* `simt.nvcc`: compiles a kernel source with the real nvcc, where the CUDA toolkit is
  installed, and parses ptxas's report of registers, spills and shared memory.
"""
