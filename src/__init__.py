"""Artist classification (Dacon 236006): a 5-fold CV training and ensembling pipeline over timm backbones.

Kept free of heavy imports so `python -m src.envcheck` runs before the dependencies are installed.
"""
