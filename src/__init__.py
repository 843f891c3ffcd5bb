"""Artist classification (Dacon 236006): a 5-fold CV training and ensembling pipeline over timm backbones.

Layers, each importing only from those before it: core, data, model, inference, training, pipeline, tools (and the
demo data generator, which only the commands that make demo data import). src/cli.py is the command line,
src/environment.py what run.sh asks for the Python a command runs in. Kept free of heavy imports so both run before
anything is installed.
"""
import os

# albumentations asks PyPI for its latest version on every import unless this is set (an offline machine prints
# "Error fetching version info"; a network that drops packets waits for a timeout): set before anything imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
