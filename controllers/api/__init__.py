"""The Cumulo API: the single source of truth for every kind; ``crds/`` is generated from it."""
