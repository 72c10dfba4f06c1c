"""The sandbox: try a whole federation on one machine.

The ``fedbridge`` CLI (``demo``, ``tiny-model``), the tiny-model builder (real architectures built from config, with
their families' chat templates), synthetic non-IID site data, the local shared benchmarks, and the local
federation runner that starts a coordinator and site agents as separate processes on loopback. Nothing here is
used by a production coordinator or site.
"""
