"""``python -m studies``: the recipe study (:mod:`studies.run`)."""

from .run import main

main()
