"""Experiments run on the library, kept out of the installed package: the recipe study
(``python -m studies``, :mod:`studies.run`), its recipes (``studies/recipes/*.json``) and its
saved results (``studies/results/*.json``). Run from a checkout of the repository."""
