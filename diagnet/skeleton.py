"""Skeletons: a nested state dict split into named arrays and a JSON-able rest, and back.

A *skeleton* is a state dict with every array replaced by a placeholder that names its
tensor (`split_state` / `join_state`). The encoding round-trips what JSON alone does not:
dicts with int keys (the optimizer's parameter indices), tuples, NumPy scalars (stored as
0-d tensors, so their dtype survives) and non-finite floats. Containers may nest
`MAX_STATE_DEPTH` deep, so that the JSON stays within the reader's `MAX_JSON_DEPTH`.

`diagnet.checkpoint` writes the tensors with `diagnet.tensorfile` and the skeletons in the
file's JSON metadata; this module knows nothing of files.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import backend
from .autograd import Tensor
from .checks import is_int
from .tensorfile import check_text, host_array

__all__ = ["split_state", "join_state", "MAX_STATE_DEPTH"]

#: how deeply dicts, lists and tuples may nest in a saved state dict, ``state`` or
#: ``config``: each level takes at most 3 JSON levels (an int-keyed dict is an object, a list
#: and a pair), and the metadata adds 3, so the JSON stays within the reader's limit
MAX_STATE_DEPTH = 32

# markers of the skeleton encoding (a JSON object holding one of these keys is a marker)
_TENSOR, _SCALAR, _TUPLE, _DICT = "__tensor__", "__scalar__", "__tuple__", "__dict__"
_MARKERS = frozenset((_TENSOR, _SCALAR, _TUPLE, _DICT))


def _leaf_array(value):
    """The backend array of a Tensor or array leaf, else None."""
    if isinstance(value, Tensor):
        return value.data
    return value if backend.is_array(value) else None


def split_state(obj, prefix):
    """Split a nested structure into tensors and a JSON-able skeleton.

    Args:
        obj: nested dicts (str or int keys), lists and tuples whose leaves are arrays
            (NumPy, CuPy, `Tensor`), NumPy scalars, or JSON values (None, bool, int,
            float, str). Floats may be non-finite.
        prefix: the first part of every tensor name (e.g. ``"optimizer"``).

    Returns:
        ``(skeleton, tensors)``: ``tensors`` maps names ``prefix/<key>/<key>...`` to NumPy
        arrays (GPU arrays copied to the host); ``skeleton`` is ``obj`` with each array
        replaced by ``{"__tensor__": name}`` (NumPy scalars add ``"__scalar__": true``),
        each tuple by ``{"__tuple__": [...]}`` and each dict that has a non-str key, or a
        key that is one of these markers, by ``{"__dict__": [[key, value], ...]}``.
        `join_state` inverts it exactly.

    Raises:
        TypeError: a value or a dict key of an unsupported type, naming where it is.
        ValueError: containers nested deeper than `MAX_STATE_DEPTH` (or one holding itself),
            or a str that is not valid Unicode (a lone surrogate), naming where it is.
    """
    tensors = {}

    def name_for(path):
        base = "/".join([prefix] + path)
        name, i = base, 1
        while name in tensors:  # keys containing "/" could collide: keep names unique
            name, i = f"{base}~{i}", i + 1
        return name

    def where(path):
        return "/".join([prefix] + path)

    def enc(value, path):
        arr = _leaf_array(value)
        if arr is not None:
            name = name_for(path)
            tensors[name] = host_array(arr, name)
            return {_TENSOR: name}
        if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
            name = name_for(path)
            tensors[name] = host_array(np.asarray(value), name)
            return {_TENSOR: name, _SCALAR: True}
        if isinstance(value, str):
            check_text(value, f"{where(path)}: the str")
            return value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, (list, tuple, dict)) and len(path) == MAX_STATE_DEPTH:
            raise ValueError(f"{where(path)}: nested deeper than {MAX_STATE_DEPTH} levels of "
                             "dicts, lists and tuples (or a container that holds itself)")
        if isinstance(value, list):
            return [enc(v, path + [str(i)]) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {_TUPLE: [enc(v, path + [str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, str) and not is_int(k):
                    raise TypeError(f"{where(path)}: dict keys must be str or int to be saved; "
                                    f"got {type(k).__name__} {k!r}")
                if isinstance(k, str):
                    check_text(k, f"{where(path)}: the key")
            if all(isinstance(k, str) for k in value) and not _MARKERS.intersection(value):
                return {k: enc(v, path + [k]) for k, v in value.items()}
            return {_DICT: [[k, enc(v, path + [str(k)])] for k, v in value.items()]}
        raise TypeError(f"{where(path)}: cannot save a {type(value).__name__} in a checkpoint "
                        "(arrays, dicts, lists, tuples, None, bool, int, float and str can be "
                        "saved)")

    return enc(obj, []), tensors


def join_state(skeleton, tensors, used=None):
    """Rebuild the structure that `split_state` split: the inverse of it.

    Args:
        skeleton: the JSON-able skeleton.
        tensors: dict name -> NumPy array holding the tensors it names.
        used: optional set; the names of the tensors consumed are added to it.

    Returns:
        The structure, with NumPy arrays (and NumPy scalars) in place of the placeholders,
        tuples and int-keyed dicts restored.

    Raises:
        ValueError: a malformed placeholder or a tensor name missing from ``tensors``.
    """
    used = set() if used is None else used

    def dec(node):
        if isinstance(node, list):
            return [dec(v) for v in node]
        if not isinstance(node, dict):
            return node
        if not _MARKERS.intersection(node):
            return {k: dec(v) for k, v in node.items()}
        if _TENSOR in node:
            name = node[_TENSOR]
            if not (set(node) <= {_TENSOR, _SCALAR}) or not isinstance(name, str):
                raise ValueError(f"malformed tensor placeholder {node!r}")
            if name not in tensors:
                raise ValueError(f"tensor {name!r} is referenced but not in the file")
            used.add(name)
            arr = tensors[name]
            if node.get(_SCALAR):
                if arr.ndim != 0:
                    raise ValueError(f"tensor {name!r} should be a scalar; has shape {arr.shape}")
                return arr[()]
            return arr
        if set(node) == {_TUPLE} and isinstance(node[_TUPLE], list):
            return tuple(dec(v) for v in node[_TUPLE])
        if set(node) == {_DICT} and isinstance(node[_DICT], list):
            out = {}
            for pair in node[_DICT]:
                if (not isinstance(pair, list) or len(pair) != 2
                        or not (isinstance(pair[0], str) or is_int(pair[0]))):
                    raise ValueError(f"malformed dict entry {pair!r}"[:200])
                out[pair[0]] = dec(pair[1])
            return out
        raise ValueError(f"malformed placeholder {node!r}"[:200])

    return dec(skeleton)
