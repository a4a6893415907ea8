"""Selective-search proposals for R-CNN and Fast R-CNN: the search, the
precompute stage and its store, recall."""
