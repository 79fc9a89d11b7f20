"""Image encoders from model files: ``onnx:<file>`` (onnxruntime) and ``tflite:<file>`` (LiteRT).

MediaPipe image embedders and many exported backbones ship this way. The file says nothing
reliable about its preprocessing, so it is given by options (and stored with the collection):

  input_size=224        side of the square input
  crop=center|resize    centre square crop then resize, or resize the whole image
  mean=0,0,0 std=1,1,1  per-channel normalisation applied after scaling pixels to [0, 1]
  pixel_range=1         multiply [0, 1] pixels by this first (255 for models wanting 0-255 floats)
  layout=auto|nchw|nhwc  input tensor layout (auto: read from the model's input shape)
  output=NAME           the feature tensor (an intermediate one for tflite); default: first output
Integer-quantised inputs get uint8 pixels; quantised outputs are dequantised with the tensor's
scale and zero point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from caselens.errors import EncoderOptionError
from caselens.ingest.encoders.base import (Encoder, EncoderInfo, file_sha256, fingerprint, l2_normalize,
                                              take_options, to_rgb)
from caselens.ingest.encoders.registry import register

_PREPROCESS_OPTIONS: dict[str, tuple[type, Any]] = {
    "input_size": (int, 224), "crop": (str, "center"), "mean": (list, [0.0, 0.0, 0.0]),
    "std": (list, [1.0, 1.0, 1.0]), "pixel_range": (float, 1.0), "layout": (str, "auto"),
    "output": (str, None), "batch_size": (int, 16), "threads": (int, 0),
}


def _model_path(scheme: str, target: str) -> Path:
    path = Path(target).expanduser()
    if not target or not path.is_file():
        raise EncoderOptionError(f"{scheme}:{target}: model file not found; give the path of a .{scheme} file")
    return path.resolve()


class ModelFileEncoder(Encoder):
    """Shared preprocessing for onnx/tflite image models; subclasses run the model."""

    scheme = ""

    def __init__(self, target: str, options: dict[str, Any]):
        self.path = _model_path(self.scheme, target)
        self.opts = take_options(self.scheme, options, _PREPROCESS_OPTIONS)
        if self.opts["crop"] not in ("center", "resize"):
            raise EncoderOptionError(f"{self.scheme}: crop must be 'center' or 'resize', not {self.opts['crop']!r}")
        if self.opts["layout"] not in ("auto", "nchw", "nhwc"):
            raise EncoderOptionError(f"{self.scheme}: layout must be auto, nchw or nhwc, not {self.opts['layout']!r}")
        if len(self.opts["mean"]) != 3 or len(self.opts["std"]) != 3 or min(self.opts["std"]) <= 0:
            raise EncoderOptionError(f"{self.scheme}: mean and std need three values each, std > 0")
        self.batch_size = self.opts["batch_size"]
        self._load()
        dim = int(self._run(self._pixels([Image.new("RGB", (8, 8))])).reshape(1, -1).shape[1])
        stored = {k: v for k, v in self.opts.items() if k not in ("batch_size", "threads")}
        self.info = EncoderInfo(spec=f"{self.scheme}:{self.path}", dim=dim, modalities=("image",),
                                fingerprint=fingerprint(self.scheme, file_sha256(self.path), stored),
                                options=stored, description=f"{self.scheme} image model {self.path.name}")

    def _load(self) -> None:
        raise NotImplementedError

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> float32 NHWC batch normalised as the options say."""
        size = self.opts["input_size"]
        out = []
        for im in images:
            im = to_rgb(im)
            if self.opts["crop"] == "center":
                w, h = im.size
                side = min(w, h)
                im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            arr = np.asarray(im.resize((size, size), Image.BILINEAR), np.float32) / 255.0
            out.append(arr)
        batch = np.stack(out)
        if self.input_is_integer:
            return np.round(batch * 255.0).astype(self.input_dtype)
        batch = batch * self.opts["pixel_range"]
        return ((batch - np.array(self.opts["mean"], np.float32)) / np.array(self.opts["std"], np.float32)).astype(np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        feats = [self._run(self._pixels(images[i:i + self.batch_size])).reshape(len(images[i:i + self.batch_size]), -1)
                 for i in range(0, len(images), self.batch_size)]
        return l2_normalize(np.concatenate(feats))


class OnnxEncoder(ModelFileEncoder):
    """An ONNX image model run by onnxruntime (CUDA provider first when available)."""

    scheme = "onnx"

    def _load(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.opts["threads"]:
            so.intra_op_num_threads = self.opts["threads"]
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # Models exported without a dynamic batch axis take one image per run.
        self.fixed_batch_one = isinstance(inp.shape[0], int) and inp.shape[0] == 1
        self.input_dtype = np.uint8 if "uint8" in inp.type else np.float32
        self.input_is_integer = self.input_dtype == np.uint8
        layout = self.opts["layout"]
        if layout == "auto":
            layout = "nchw" if len(inp.shape) == 4 and inp.shape[1] in (1, 3) else "nhwc"
        self.layout = layout
        names = [o.name for o in self.session.get_outputs()]
        if self.opts["output"] and self.opts["output"] not in names:
            raise EncoderOptionError(f"onnx:{self.path}: output {self.opts['output']!r} not in model outputs {names}")
        self.output_name = self.opts["output"] or names[0]

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        if self.layout == "nchw":
            pixels = pixels.transpose(0, 3, 1, 2)
        chunks = [pixels[i:i + 1] for i in range(len(pixels))] if self.fixed_batch_one else [pixels]
        outs = [self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(c)})[0] for c in chunks]
        return np.asarray(np.concatenate(outs), np.float32)


class TfliteEncoder(ModelFileEncoder):
    """A TensorFlow Lite image model (e.g. a MediaPipe image embedder) run by ai-edge-litert."""

    scheme = "tflite"

    def _load(self) -> None:
        import warnings

        from ai_edge_litert.interpreter import Interpreter

        self._Interpreter = Interpreter
        preserve = bool(self.opts["output"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.interp = Interpreter(model_path=str(self.path), num_threads=self.opts["threads"] or None,
                                      experimental_preserve_all_tensors=preserve)
        self.interp.allocate_tensors()
        inp = self.interp.get_input_details()[0]
        self.input_index, self.input_shape = inp["index"], tuple(inp["shape"])
        self.input_dtype = inp["dtype"]
        self.input_is_integer = np.issubdtype(self.input_dtype, np.integer)
        if self.opts["layout"] not in ("auto", "nhwc"):
            raise EncoderOptionError(f"tflite:{self.path}: TFLite image models take NHWC input")
        if self.input_shape[1] != self.opts["input_size"]:
            self.opts["input_size"] = int(self.input_shape[1])
        tensors = {t["name"]: t for t in self.interp.get_tensor_details()}
        if self.opts["output"]:
            if self.opts["output"] not in tensors:
                close = [n for n in tensors if self.opts["output"].split("/")[-1] in n][:5]
                raise EncoderOptionError(f"tflite:{self.path}: no tensor named {self.opts['output']!r}"
                                         + (f" (similar: {close})" if close else ""))
            self.output = tensors[self.opts["output"]]
        else:
            self.output = self.interp.get_output_details()[0]

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        feats = []
        for one in pixels:  # the interpreter is allocated for batch 1
            self.interp.set_tensor(self.input_index, one[None].astype(self.input_dtype))
            self.interp.invoke()
            raw = self.interp.get_tensor(self.output["index"]).astype(np.float32).reshape(-1)
            scale, zero = self.output.get("quantization", (0.0, 0))
            feats.append((raw - zero) * scale if scale else raw)
        return np.stack(feats)


@register("onnx", "ONNX image model file (onnxruntime); preprocessing given by options")
def _load_onnx(target: str, options: dict[str, Any]) -> Encoder:
    return OnnxEncoder(target, options)


@register("tflite", "TensorFlow Lite image model file (MediaPipe embedders); preprocessing by options")
def _load_tflite(target: str, options: dict[str, Any]) -> Encoder:
    return TfliteEncoder(target, options)
