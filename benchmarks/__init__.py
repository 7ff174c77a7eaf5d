"""Benchmarks of eco_optax, run from a checkout (not part of the installed package).

* ``python -m benchmarks``: training quality of every method on a byte-level LM.
* ``python -m benchmarks.step``: optimizer step time against ``optax.adamw``.
* ``python -m benchmarks.memory``: peak memory of a compiled train step.

They need the ``bench`` extra (matplotlib, tqdm): ``pip install -e '.[bench]'``.
"""
