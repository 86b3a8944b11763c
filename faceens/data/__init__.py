"""Data sources for faceens: image folders, the bundled ORL demo faces, deterministic batching."""
