"""gpo_lit: visual-semantic embedding with learnable pooling (VSE∞ / GPO) on Lightning + Hydra."""

__version__ = "0.1.0"
