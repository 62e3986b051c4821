"""Recipes: end-to-end training jobs built from the library (the main job lives here)."""
