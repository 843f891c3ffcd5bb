"""Tools around the pipeline: tuning, speed (bench, gpucheck), few-shot, style transfer, EDA pictures, TensorBoard."""
