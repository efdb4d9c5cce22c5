"""Applies to every test: no test may reach the Hugging Face Hub (set before huggingface_hub loads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
