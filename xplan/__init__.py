"""xplan: plan, price and run parallel layouts for large dense and MoE transformers."""

__version__ = "0.1.0"
