"""Inference backends for one registry version: ONNX Runtime, TorchScript or PyTorch, plus generation.

Used by the Serve replicas, by export (parity, int8 accuracy) and by the benchmarks, so
the served path and the measured path are the same code.

    encode(texts | images) ─▶ Batch(inputs: the model's named arrays, truncated) ─▶ backend.logits ─▶ softmax
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lifelong.errors import LifelongError, first_line
from lifelong.tasks import causal_lm, task_of_architectures
from lifelong.tasks import task as family

BACKENDS = ("onnx", "onnx-int8", "torchscript", "torch")
# The file each exported backend loads from a version (`lifelong export` writes them).
EXPORT_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torchscript": "model.torchscript.pt"}


class BackendError(LifelongError):
    """A version that cannot be loaded or run with the requested backend."""


@dataclass
class Batch:
    """A model's inputs by name, in the order its exports take them (text: input_ids and
    attention_mask, int64 [batch, seq]; images: pixel_values, float32 [batch, 3, h, w])."""

    inputs: dict[str, np.ndarray]
    truncated: list[bool]

    @property
    def input_ids(self) -> np.ndarray:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> np.ndarray:
        return self.inputs["attention_mask"]

    @property
    def shape(self) -> list[int]:
        return list(next(iter(self.inputs.values())).shape)


class Encoder:
    """Tokenizes a list of texts into a right-padded batch, truncating to `max_length` and
    reporting which texts were cut (the fast tokenizer's own truncation keeps special tokens)."""

    def __init__(self, model_dir: str | Path, max_length: int):
        from lifelong.models import load_tokenizer

        tok = load_tokenizer(model_dir)
        self.max_length = max_length
        self.pad_id = tok.pad_token_id
        self.tokenizer = tok
        self._fast = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
        self._fast.enable_truncation(max_length=max_length)
        self._fast.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token)

    def __call__(self, texts: list[str]) -> Batch:
        encodings = self._fast.encode_batch(list(texts))
        return Batch(
            inputs={
                "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            },
            truncated=[bool(e.overflowing) for e in encodings],
        )


class ImageEncoder:
    """Encoded images (PNG, JPEG, ... bytes) → pixel values by the version's image processor."""

    def __init__(self, model_dir: str | Path, max_length: int | None = None):
        from lifelong.tasks.image_classification import cached_processor

        self.processor = cached_processor(str(model_dir))

    def __call__(self, images: list[bytes]) -> Batch:
        from lifelong.tasks.image_classification import decode, pixel_values

        return Batch(inputs={"pixel_values": pixel_values(self.processor, [decode(b) for b in images])}, truncated=[False] * len(images))


def model_max_length(model_dir: str | Path, trained: int | None = None) -> int:
    """The sequence length the version was trained for (`Card.max_length`), capped by its positions."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    positions = config.get("n_positions") or config.get("max_position_embeddings") or 512
    return int(min(trained or positions, positions))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxLogits:
    def __init__(self, path: Path, threads: int, device: str = "cpu"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "this ONNX Runtime has no CUDA provider (the onnxruntime package is CPU-only): install onnxruntime-gpu "
                    "on the GPU nodes, or set serve.backend=torch to serve with PyTorch on the GPU"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BackendError(f"ONNX Runtime cannot load {path.name}: {e}") from None

    def __call__(self, batch: Batch) -> np.ndarray:
        return self.session.run(["logits"], batch.inputs)[0]


class TorchScriptLogits:
    """A traced module (export.export_torchscript): the model's inputs, in order → logits."""

    def __init__(self, path: Path, threads: int | None, device: str = "cpu"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("serve.gpus_per_replica asks for a GPU but PyTorch sees no CUDA device on this replica's node")
        self.torch, self.device = torch, torch.device(device)
        try:
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise BackendError(f"TorchScript cannot load {Path(path).name}: {first_line(e, 300)}") from None

    def __call__(self, batch: Batch) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            logits = self.module(*(torch.from_numpy(v).to(self.device) for v in batch.inputs.values()))
        return logits.float().cpu().numpy()


class TorchLogits:
    def __init__(self, model_dir: Path, task: str, threads: int | None, model=None, device: str = "cpu"):
        import torch

        from lifelong.models import load_for_inference

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("serve.gpus_per_replica asks for a GPU but PyTorch sees no CUDA device on this replica's node")
        self.torch, self.device = torch, torch.device(device)
        self.forward_kwargs = family(task).FORWARD_KWARGS
        if model is not None:  # already loaded by the caller
            self.model = model
            return
        try:
            self.model = load_for_inference(model_dir, task).to(self.device)
        except (OSError, ValueError, RuntimeError) as e:
            raise BackendError(f"PyTorch cannot load the weights in {model_dir}: {e}") from None

    def __call__(self, batch: Batch) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(**{k: self.torch.from_numpy(v).to(self.device) for k, v in batch.inputs.items()}, **self.forward_kwargs)
        return out.logits.float().cpu().numpy()


class Classifier:
    """Texts or images → label probabilities for one version, with the chosen backend."""

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "onnx",
        max_length: int | None = None,
        threads: int = 1,
        exported: str | Path | None = None,
        device: str = "cpu",
    ):
        """`max_length`: what the version was trained for (its card's); `exported` overrides the
        version's file for the backend (export scores files before they are stored)."""
        model_dir = Path(model_dir)
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
        config = json.loads((model_dir / "config.json").read_text())
        architectures = config.get("architectures") or []
        task = task_of_architectures(architectures)
        if not family(task).LABELLED:
            raise BackendError(f"{model_dir} holds a {', '.join(architectures or ['?'])} model, not a classifier")
        id2label = config.get("id2label") or {}
        self.labels = [id2label[str(i)] for i in range(len(id2label))]
        self.backend, self.task = backend, task
        self.max_length = model_max_length(model_dir, max_length)
        self.encode = family(task).encoder(model_dir, self.max_length)
        if backend == "torch":
            self.logits = TorchLogits(model_dir, task, threads, device=device)
            return
        path = Path(exported) if exported else model_dir / EXPORT_FILES[backend]
        if not path.exists():
            flag = " --torchscript" if backend == "torchscript" else ""
            raise BackendError(f"{model_dir} has no {path.name}: export it first (lifelong export NAME:VERSION{flag})")
        self.logits = TorchScriptLogits(path, threads, device) if backend == "torchscript" else OnnxLogits(path, threads, device)

    def probabilities(self, items: list) -> tuple[np.ndarray, list[bool]]:
        batch = self.encode(items)
        return softmax(self.logits(batch)), batch.truncated

    def predict(self, items: list) -> list[dict]:
        """One prediction per text (or encoded image): its label, every label's probability, and
        whether the text was cut to the model's length (never, for an image)."""
        probs, truncated = self.probabilities(items)
        return [
            {
                "label": self.labels[int(p.argmax())],
                "probabilities": {label: float(x) for label, x in zip(self.labels, p)},
                "truncated": cut,
            }
            for p, cut in zip(probs, truncated)
        ]


class Generator:
    """Prompt → continuation with a causal LM in PyTorch (KV-cached: HF's generate keeps each
    step's keys and values, so a new token costs one position, not the whole prefix), whole or
    streamed token by token (`stream`)."""

    def __init__(self, model_dir: str | Path, max_length: int | None = None, threads: int | None = 1, device: str = "cpu"):
        import torch

        model_dir = Path(model_dir)
        self.torch = torch
        self.logits = TorchLogits(model_dir, causal_lm.NAME, threads, device=device)
        self.model = self.logits.model
        self.max_length = model_max_length(model_dir, max_length)
        self.encode = Encoder(model_dir, self.max_length)
        self._sampling_lock = threading.Lock()

    def generate(
        self, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, use_cache: bool = True, stop: Sequence[str] = ()
    ) -> dict:
        """{text, tokens, truncated, prompt_tokens, finish_reason}: the whole continuation; with
        `stop` sequences, up to the first of them (not included; finish_reason stop)."""
        ids, truncated, new_tokens = self._prompt(prompt, max_new_tokens)
        with self._sampling(temperature, seed), self.torch.inference_mode():
            out = self.model.generate(**self._generate_kwargs(ids, new_tokens, temperature, stop), use_cache=use_cache)
        continuation = out[0, len(ids) :].tolist()
        text, stopped = _until_stop(self.encode.tokenizer.decode(continuation, skip_special_tokens=True), stop)
        return self._summary(continuation, ids, truncated, text, stopped)

    def generate_greedy(self, asks: Sequence[tuple[str, int, Sequence[str]]]) -> list[dict]:
        """Greedy continuations of several (prompt, max_new_tokens, stop) in one generate call
        (requests batched across clients; sampled ones are not, their seeds would not hold):
        the prompts left-padded (the model places each row's tokens by its attention mask), each
        row cut at its own max_new_tokens, EOS and first stop sequence. A row that cannot share
        the batch's length within the model's positions goes alone. Each answer as generate()'s."""
        torch = self.torch
        prepared = [self._prompt(prompt, n) for prompt, n, _ in asks]
        new = max(n for _, _, n in prepared)
        together = [i for i, (ids, _, _) in enumerate(prepared) if len(ids) + new <= self.max_length]
        if len(together) < 2:
            return [self.generate(prompt, n, stop=stop) for prompt, n, stop in asks]
        width = max(len(prepared[i][0]) for i in together)
        pad, eos = self.encode.pad_id, self.encode.tokenizer.eos_token_id
        rows = [prepared[i][0] for i in together]
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=self.logits.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=self.logits.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        answers: list[dict | None] = [None] * len(asks)
        for row, i in enumerate(together):
            ids, truncated, new_tokens = prepared[i]
            continuation = out[row, width:].tolist()[:new_tokens]
            if eos in continuation:  # the row ended; what follows is padding
                continuation = continuation[: continuation.index(eos) + 1]
            stop = asks[i][2]
            text, stopped = _until_stop(self.encode.tokenizer.decode(continuation, skip_special_tokens=True), stop)
            if stopped:  # alone, generation would have stopped at the token that completed the stop sequence
                continuation = next(
                    continuation[:k]
                    for k in range(1, len(continuation) + 1)
                    if _until_stop(self.encode.tokenizer.decode(continuation[:k], skip_special_tokens=True), stop)[1]
                )
            answers[i] = self._summary(continuation, ids, truncated, text, stopped)
        for i, (prompt, n, stop) in enumerate(asks):
            if answers[i] is None:
                answers[i] = self.generate(prompt, n, stop=stop)
        return answers

    def stream(
        self, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, interval_s: float = 0.02, stop: Sequence[str] = ()
    ):
        """The continuation as it is generated: {"text": piece} as soon as the first token makes
        text, then the text of each `interval_s` (0: of each token), then the summary generate()
        returns (without the text). Closing the iterator early stops the generation at its next token.
        With `stop` sequences it ends before the first of them; text that may begin one is held
        back until it is known not to."""
        from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        ids, truncated, new_tokens = self._prompt(prompt, max_new_tokens)
        tokens: queue.Queue = queue.Queue()
        cancel = threading.Event()

        class Tokens(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                tokens.put(value.reshape(-1).tolist())

            def end(self):
                tokens.put(None)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        failure: list[BaseException] = []

        def run():
            try:
                with self._sampling(temperature, seed), torch.inference_mode():
                    self.model.generate(
                        **self._generate_kwargs(ids, new_tokens, temperature, stop),
                        streamer=Tokens(),
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    )
            except BaseException as e:  # raised in the consumer, not lost in this thread
                failure.append(e)
                tokens.put(None)

        worker = threading.Thread(target=run, name="lifelong-generate", daemon=True)
        worker.start()
        continuation, shown, ended, last, stopped = [], "", False, 0.0, False
        held = max((len(s) for s in stop), default=1) - 1  # characters that may be the start of a stop sequence
        try:
            while not ended and not stopped and (piece := tokens.get()) is not None:
                continuation += piece
                # After the first piece, the tokens of every `interval_s` go out together: an
                # event costs the HTTP path far more than a token costs this model.
                while shown and (wait := last + interval_s - time.monotonic()) > 0:
                    try:
                        more = tokens.get(timeout=wait)
                    except queue.Empty:
                        break
                    if more is None:
                        ended = True
                        break
                    continuation += more
                text, stopped = _until_stop(self.encode.tokenizer.decode(continuation, skip_special_tokens=True), stop)
                if not stopped and held:
                    text = text[: max(len(text) - held, len(shown))]
                # A byte-level token can end inside a character: hold it back until it is whole.
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield {"text": text[len(shown) :]}
                    shown, last = text, time.monotonic()
            if failure:
                raise failure[0]
            text, stopped = _until_stop(self.encode.tokenizer.decode(continuation, skip_special_tokens=True), stop)
            if len(text) > len(shown):
                yield {"text": text[len(shown) :]}
            yield self._summary(continuation, ids, truncated, None, stopped)
        finally:
            cancel.set()
            worker.join()

    def chat_prompt(self, messages: list[dict]) -> str:
        """Chat messages ({role, content}) as one prompt: the tokenizer's chat template when it
        has one, else one "role: content" line each and "assistant:" to answer."""
        tok = self.encode.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _prompt(self, prompt: str, max_new_tokens: int) -> tuple[list[int], bool, int]:
        # Keep the prompt's tail so prompt + continuation fit the model's positions.
        ids = self.encode.tokenizer(prompt)["input_ids"]
        keep = max(1, self.max_length - max_new_tokens)
        truncated = len(ids) > keep
        ids = ids[-keep:]
        return ids, truncated, min(max_new_tokens, self.max_length - len(ids))

    def _generate_kwargs(self, ids: list[int], new_tokens: int, temperature: float, stop: Sequence[str] = ()) -> dict:
        torch, device = self.torch, self.logits.device
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 50} if temperature > 0 else {"do_sample": False}
        # HF's generate stops once a stop sequence is in the text (the cut is ours: _until_stop)
        stopping = {"stop_strings": list(stop), "tokenizer": self.encode.tokenizer} if stop else {}
        return {
            "input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
            "max_new_tokens": new_tokens,
            "pad_token_id": self.encode.pad_id,
            **sampling,
            **stopping,
        }

    def _sampling(self, temperature: float, seed: int):
        # HF's sampler draws from torch's process-wide generator: concurrent sampled requests
        # take turns, each seeding a forked copy, so a seed gives the same text under load.
        return _seeded(self._sampling_lock, seed) if temperature > 0 else contextlib.nullcontext()

    def _summary(self, continuation: list[int], ids: list[int], truncated: bool, text: str | None, stopped: bool = False) -> dict:
        eos = self.encode.tokenizer.eos_token_id
        out = {
            "tokens": len(continuation),
            "truncated": truncated,
            "prompt_tokens": len(ids),
            # stop: the model ended its text (EOS) or met a stop sequence; length: it ran into
            # max_new_tokens or the positions.
            "finish_reason": "stop" if stopped or (continuation and continuation[-1] == eos) else "length",
        }
        return out if text is None else {"text": text, **out}


def _until_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first of the `stop` sequences in it (not included), and whether one was."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@contextlib.contextmanager
def _seeded(lock: threading.Lock, seed: int):
    import torch

    with lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
