"""A local vision-language generator: a tiny random LLaVA built from configs, shown the retrieved images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.retrieval.rag import Request, load_generator
from caselens.retrieval.rag.context import ContextItem
from caselens.retrieval.rag.generators import TransformersVLMGenerator

WORDS = ("the of and a to in is it airways asthma lung lungs disease chronic bone skin yes no which organ "
         "answer question sources source key doc case cite image Image A B C . , : [ ] < > = / \" ?").split()
N_PATCHES = (32 // 8) ** 2  # image tokens per image: 32x32 pixels in 8x8 patches (CLS dropped)
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}\n{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised LLaVA (1-layer CLIP vision tower, 1-layer Llama) with its processor, saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    folder = tmp_path_factory.mktemp("tiny_vlm")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<image>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<image>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=fast, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=TEMPLATE)
    processor.save_pretrained(folder)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


def png(path: Path, seed: int) -> str:
    """A random 40x30 RGB PNG (not square, not the model's size: the processor resizes and crops)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return str(path)


def case(key: str, image_path: str | None, score: float) -> ContextItem:
    return ContextItem(f"case:{key}", "case", "cxr", key, "chronic disease of the lung", score, image_path,
                       image_path)


def test_vlm_generator_sees_the_retrieved_images(tiny_vlm: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import torch

    gen = load_generator(f"hf:{tiny_vlm}")
    assert isinstance(gen, TransformersVLMGenerator) and gen is load_generator(f"hf:{tiny_vlm}")
    assert "vision-language" in gen.name and gen.context_limit == 4096
    items = [case("a", png(tmp_path / "a.png", 1), 0.9), case("b", png(tmp_path / "b.png", 2), 0.8),
             case("c", str(tmp_path / "missing.png"), 0.7),  # no file: no image, text still in the prompt
             case("d", str(tmp_path / "not_an_image.png"), 0.65),  # unreadable: left out, and logged
             ContextItem("doc:x", "doc", "kb", "x", "asthma is a chronic disease of the airways", 0.6)]
    (tmp_path / "not_an_image.png").write_text("DICM, say")
    request = Request("which organ ?", items, max_new_tokens=6)

    with caplog.at_level(logging.WARNING, logger="caselens.retrieval.rag.generators"):
        inputs = gen.inputs(request)
    assert "image of [case:d] left out" in caplog.text
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 32, 32)  # two images, resized and cropped
    assert int((inputs["input_ids"] == gen.model.config.image_token_id).sum()) == 2 * N_PATCHES
    content = gen.messages(request, gen.images(request))[0]["content"]
    assert [c["text"] for c in content if c["type"] == "text"][:2] == ["Image of [case:a]:", "Image of [case:b]:"]
    assert [c["type"] for c in content].count("image") == 2 and "<source" in content[-1]["text"]

    text = gen.generate(request)
    assert isinstance(text, str)

    # The pixels reach the model: another image for case b changes the logits; the same pixels
    # from another file do not.
    def logits(request: Request) -> torch.Tensor:
        with torch.no_grad():
            return gen.model(**gen.inputs(request)).logits[0, -1].float().cpu()

    same = [items[0], case("b", png(tmp_path / "b_copy.png", 2), 0.8)] + items[2:]
    other = [items[0], case("b", png(tmp_path / "b_other.png", 3), 0.8)] + items[2:]
    assert torch.allclose(logits(request), logits(Request("which organ ?", same)), atol=1e-6)
    assert (logits(request) - logits(Request("which organ ?", other))).abs().max() > 1e-4

    # Multiple choice: options scored by likelihood with the images in the prompt.
    options = {"A": "lung", "B": "bone skin"}
    mc = Request("which organ ?", items, task="mc", options=options)
    scores = gen.choice_scores(mc)
    assert set(scores) == {"A", "B"} and all(s < 0 for s in scores.values())
    best = max(scores, key=scores.get)
    assert gen.generate(mc) == f"{best}. {options[best]}"
    assert gen.choice_scores(Request("which organ ?", other, task="mc", options=options)) != scores
    # The cached-prefix scoring equals a plain forward pass over prompt + images + option.
    prefix = gen.inputs(mc)
    cont = gen.tokenizer(" B. bone skin", add_special_tokens=False, return_tensors="pt")["input_ids"].to(gen.device)
    ids = torch.cat([prefix["input_ids"], cont], dim=1)
    with torch.no_grad():
        out = gen.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prefix["pixel_values"])
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    naive = float(logp[-cont.shape[1]:].gather(1, ids[0, -cont.shape[1]:, None]).mean())
    assert scores["B"] == pytest.approx(naive, abs=1e-4)
    assert gen.count_tokens("asthma lung") == 2

    # Beyond max_images the lowest-ranked images are dropped, and the log says which; without a
    # chat template the model's image token goes in the plain-text prompt.
    capped = TransformersVLMGenerator(str(tiny_vlm), max_images=1)
    capped.processor.chat_template = None
    with caplog.at_level(logging.WARNING, logger="caselens.retrieval.rag.generators"):
        inputs = capped.inputs(request)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == capped.model.config.image_token_id).sum()) == N_PATCHES
    assert "dropped, lowest-ranked: case:b" in caplog.text
    assert capped.generate(mc) in {"A. lung", "B. bone skin"}


def test_vision_language_detection(tiny_vlm: Path, tmp_path: Path) -> None:
    """Only a config with a vision tower makes ``hf:`` load the vision-language generator."""
    import json

    from caselens.retrieval.rag.generators import is_vision_language

    assert is_vision_language(str(tiny_vlm))
    assert not is_vision_language(str(tmp_path / "absent"))  # unreadable: the text loader reports it

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert not is_vision_language(str(tmp_path))
