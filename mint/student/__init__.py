"""Student LLMs: load any HF causal LM, a GGUF file, or a tiny Llama built from config."""

from mint.student.gguf import smollm2_gguf
from mint.student.load import load_student
from mint.student.tiny import build_tiny_llama

__all__ = ["build_tiny_llama", "load_student", "smollm2_gguf"]
