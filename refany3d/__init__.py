"""refany3d: build a pose-aligned 3D-asset dataset from Subjects200K and train RefAny3D."""

__version__ = "0.1.0"
