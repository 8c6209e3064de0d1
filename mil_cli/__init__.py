"""milcli: attention multiple-instance learning for whole-slide images, from slides to heatmaps."""

__version__ = "0.1.0"
