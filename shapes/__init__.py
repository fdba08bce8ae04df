"""Shapes world and ShapesEval: the project's in-house GenEval."""
