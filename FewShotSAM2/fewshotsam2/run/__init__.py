"""One segmentation run: the Segmenter ladder, the per-run state (pipeline), refine, range ends, overlaps between structures, progress, the result types."""
