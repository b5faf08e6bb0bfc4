"""Bundled demo models and the procedural images the shapes model was trained on."""
