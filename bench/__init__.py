"""Benchmarks of solace-rl: `python -m bench all` (issue #7); see bench/__main__.py."""
