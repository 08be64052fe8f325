"""RAT-SPN density estimation in plain torch: exact (marginal) likelihoods, stochastic EM, sampling, MPE."""

from spn.distributed import all_reduce_stats, broadcast_module, default_stats_reducer, is_distributed
from spn.em_schedule import em_step_size
from spn.leaves import CategoricalLeaves, CompositeLeaves, GaussianLeaves, LeafLayout, LeafSpec, Leaves
from spn.rat_spn import RatSpn
from spn.region_graph import RegionGraph, balanced_region_sizes, random_region_graph

__all__ = [
    "CategoricalLeaves",
    "CompositeLeaves",
    "GaussianLeaves",
    "LeafLayout",
    "LeafSpec",
    "Leaves",
    "RatSpn",
    "RegionGraph",
    "all_reduce_stats",
    "balanced_region_sizes",
    "broadcast_module",
    "default_stats_reducer",
    "em_step_size",
    "is_distributed",
    "random_region_graph",
]
