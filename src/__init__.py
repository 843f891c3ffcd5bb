"""Artist classification (Dacon 236006): a 5-fold CV training and ensembling pipeline over timm backbones.

Layers, each importing only from those before it: core, data, model, inference, training, pipeline, tools (and the
demo data generator, which only the commands that make demo data import). src/cli.py is the command line.
Kept free of heavy imports so `python -m src.core.envcheck` and `bash run.sh help` run before anything is installed.
"""
