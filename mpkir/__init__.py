"""mpkir: compile an LLM forward pass written in .mpk into one persistent CUDA megakernel."""

__version__ = "0.1.0"
