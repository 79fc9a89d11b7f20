"""Grounded answers: retrieve passages, prompt a generator, check the citations."""

from caselens.retrieval.rag.answer import Answer, ask
from caselens.retrieval.rag.generators import ExtractiveGenerator, GemmaGenerator, load_generator

__all__ = ["Answer", "ExtractiveGenerator", "GemmaGenerator", "ask", "load_generator"]
