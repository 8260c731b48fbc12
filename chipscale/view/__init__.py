"""``chipscale view``: a local web map of a job's imagery with its results on top, served by
one process (:mod:`~chipscale.view.server`) from the results store
(:mod:`~chipscale.view.overlay`, :mod:`~chipscale.view.aggregate`) and the job's source
through chipscale's own tile readers (:mod:`~chipscale.view.imagery`). The page and its map
library (Leaflet, vendored from npm) are package data under ``static/``."""
