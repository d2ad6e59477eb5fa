"""FewShotSAM2 core: few-shot 3D segmentation with SAM2, without Slicer, Qt or VTK."""

__version__ = "0.1.0"
