"""Plumbing: loading weights and tokenizers from Hugging Face folders and llama2.c checkpoints."""
