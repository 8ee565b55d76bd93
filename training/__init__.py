"""RecMesh offline training: synthetic world, models, export, index and artifact sets.

Importing this package is cheap and torch-free; services use :mod:`core.artifacts`,
:mod:`core.prerank` and :mod:`training.index` without torch. The training
entry point is :func:`training.pipeline.train` (or ``python -m training train``).
"""
