"""Shared by every layer: errors, paths, the config schema and its resolution, atomic files, the experiment folder's
layout, the runtime (device, seeds, precision), the process group and the metrics."""
