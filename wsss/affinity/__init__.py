"""Learned pixel affinities (AffinityNet): the pure functions (:mod:`wsss.affinity.core`) and training the
head / walking the maps (:mod:`wsss.affinity.train`)."""

from wsss.affinity.core import (GRID_STRIDE, AffinityHead, affinity_loss, grid_labels, grid_size, pair_affinities, pair_indices,
                                pair_offsets, random_walk, refine_maps, transition_matrix)

__all__ = ["GRID_STRIDE", "AffinityHead", "affinity_loss", "grid_labels", "grid_size", "pair_affinities", "pair_indices",
           "pair_offsets", "random_walk", "refine_maps", "transition_matrix"]
