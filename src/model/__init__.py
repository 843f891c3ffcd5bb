"""The network: a timm backbone with the artists' head, its weights, its checkpoints, and its speed switches."""
