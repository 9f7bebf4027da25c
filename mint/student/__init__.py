"""Student LLMs: build or load them (any HF causal LM, a GGUF file, a tiny Llama, a Mllama vision
model), and `kinds.py`, the one place that decides whether a student reads text or images."""

from mint.student.gguf import smollm2_gguf
from mint.student.load import load_student
from mint.student.tiny import build_tiny_llama

__all__ = ["build_tiny_llama", "load_student", "smollm2_gguf"]
