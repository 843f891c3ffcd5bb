"""Shared by every layer: errors, paths, plain names, the config schema and its resolution, atomic files, the one
delete, the experiment folder's layout, credentials hidden in URLs, the runtime (device, seeds, precision), the
process group and the metrics."""
