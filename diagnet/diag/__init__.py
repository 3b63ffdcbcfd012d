"""Diagonal sparse kernels: layout helpers, NumPy reference, compiled CPU and CUDA kernels."""
