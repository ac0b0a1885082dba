"""Serving a trained run: ``moe translate`` (text in, text out), ``moe quantize`` (integer
expert weights) and ``moe distill`` (a dense student of a sparse teacher), and what serving
costs (``speed``: parameter bytes, decode tokens/s). Above ``moe.pathways``, below the report."""
