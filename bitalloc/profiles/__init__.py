"""The profiler: per-matrix errors of every config, checkpointed per matrix, shardable."""

from bitalloc.profiles.ray_executor import profile_with_ray
from bitalloc.profiles.runner import ProfileRequest, prepare_fisher, profile
from bitalloc.profiles.shards import merge_profiles, parse_shard, shard_indices
from bitalloc.profiles.store import ProfileError, load_profile

__all__ = [
    "ProfileError",
    "ProfileRequest",
    "load_profile",
    "merge_profiles",
    "parse_shard",
    "prepare_fisher",
    "profile",
    "profile_with_ray",
    "shard_indices",
]
