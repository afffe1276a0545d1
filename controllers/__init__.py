"""The Cumulo controller: one reconciler per kind, plus the pure planning modules they use."""
