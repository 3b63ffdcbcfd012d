"""CUDA C sources of diagnet's GPU kernels, shipped as package data (``diagnet.kernels``).

The ``.cu`` files are compiled at run time by ``cupy.RawModule`` (see `diagnet.diag.cuda`).
"""
