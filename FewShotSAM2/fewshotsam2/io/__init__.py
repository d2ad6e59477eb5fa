"""Files in and out: volumes with their geometry, label maps, atomic writes, output checks, sample data."""
