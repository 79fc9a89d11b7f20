"""Grounded answers: retrieve cases and passages, prompt a generator, check the citations."""

from caselens.retrieval.rag.answer import Answer, AskConfig, ask, retrieve_context
from caselens.retrieval.rag.generators import ExtractiveGenerator, GemmaGenerator, Request
from caselens.retrieval.rag.registry import load_generator

__all__ = ["Answer", "AskConfig", "ExtractiveGenerator", "GemmaGenerator", "Request", "ask", "load_generator",
           "retrieve_context"]
