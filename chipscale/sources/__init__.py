"""Where tile pixels come from: COGs and rasters through GDAL, XYZ tile endpoints."""
