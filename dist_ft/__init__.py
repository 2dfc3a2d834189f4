"""dist_ft: fine-tune a Hugging Face causal LM into a chat model with DeepSpeed, from one CPU to a cluster."""

__version__ = "0.1.0"
