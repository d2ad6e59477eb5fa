"""Volumes -> SAM2-ready slices: intensity windows, slice plans, windowed stacks, slice ranges and their estimate, which support slices prompt SAM2."""
