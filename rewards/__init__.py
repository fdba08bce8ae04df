"""Reward models that score generated images."""
