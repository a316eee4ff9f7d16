"""Cluster files, the local launcher (`capkv up`) and fault injection."""
