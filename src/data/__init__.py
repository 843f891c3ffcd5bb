"""The data: the competition's files checked on load, shared folds, image decoding, the test geometry and validation
crops, transforms, samplers, loaders and the image cache."""
