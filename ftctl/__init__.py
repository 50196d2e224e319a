"""ftctl: generate data, fine-tune incrementally, gate and deploy a Chinese intent classifier."""

__version__ = "0.3.0"
