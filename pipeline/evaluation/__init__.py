"""The dataset evaluation after the shards: feature sums merged into FID/KID/IS, diversity, the reference
set's features, near-duplicates and leakage; derived files stamped with what they came from.
"""
