"""Prediction on rasters of any size: file handling, sliding window and blending, TTA, raster writers, previews."""
