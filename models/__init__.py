"""Model definitions built only on diagnet's public API (``diagnet.models``)."""
