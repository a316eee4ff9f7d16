"""Benchmarks that print JSON figures; never run as tests."""
