"""Slicer-side helpers of the FewShotSAM2 module: MRML conversion, the segmentation process runner, dependency set-up.

The computation itself lives in the core package `fewshotsam2`, which imports no slicer, qt or vtk.
"""
