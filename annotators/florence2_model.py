"""Florence-2 at run time: load any model reference, generate a task batch-wise, parse the answer.

Why one wrapper: the annotator (stage 1), the region-text captioner and the refinement trainer and
relabeler (stage 3) all need the same three things: load a hub id / local dir / `random:<cfg>` the
same way on every worker, generate a task batch-wise, and parse the generated text with the
processor's own `post_process_generation` (so our geometry follows transformers' rules).

Random models (`random:tiny`, `random:base`, `random:<config>`) are built by
engine.random_models.florence2; the task table (tokens, prompts, inputs) is schemas.florence2_tasks.
Running a model is annotation work, so the wrapper stays with the annotators: the engine never runs one.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models import parse_model_ref

if TYPE_CHECKING:
    from annotators.florence2_scores import Generated
from schemas.florence2_tasks import task as florence2_task


class Florence2Model:
    """transformers' native Florence2ForConditionalGeneration + Florence2Processor, loaded once per worker."""

    def __init__(self, model, processor, ref: str, revision: str, device: str):
        self.model = model
        self.processor = processor
        self.ref = ref
        self.revision = revision
        self.device = device
        # task -> most new tokens (a refinement round sizes them from its training targets); generate's
        # max_new_tokens stays the cap
        self.token_limits: dict[str, int] = {}

    @classmethod
    def load(cls, ref: str, device: str | None = None, dtype: str | None = None) -> "Florence2Model":
        """hub id | local dir | random:tiny | random:base | random:<cfg.json/yaml>.

        dtype: None -> float32 on CPU, bfloat16 on CUDA (the hub's recommended inference dtype).
        """
        import torch
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        from engine.stage import pick_device

        mref = parse_model_ref(ref)
        device = device or pick_device()
        if mref.kind == "random":
            from engine.random_models.florence2 import build_random_florence2

            model, processor = build_random_florence2(mref.random_config())
        else:
            kwargs = {"revision": mref.revision} if mref.kind == "hub" else {}
            model = Florence2ForConditionalGeneration.from_pretrained(mref.location, **kwargs)
            processor = Florence2Processor.from_pretrained(mref.location, **kwargs)
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = model.to(device=device, dtype=torch_dtype).eval()
        return cls(model, processor, ref, mref.revision, device)

    # ----------------------------------------------------------------- generation
    @staticmethod
    def prompts(task: str, count: int, text_inputs: list[str | None] | None = None) -> list[str]:
        """The task token (+ its input) per image, as the processor expects them."""
        takes_input = florence2_task(task).takes_input  # ValueError for an unknown task
        if text_inputs is None:
            text_inputs = [None] * count
        if len(text_inputs) != count:
            raise ValueError(f"{task}: {len(text_inputs)} text inputs for {count} images")
        out = []
        for i, text in enumerate(text_inputs):
            if takes_input:
                if not text:
                    raise ValueError(f"{task} needs a text input; image {i} has none")
                out.append(task + text)
            else:
                if text:
                    raise ValueError(f"{task} takes no text input; image {i} has {text!r}")
                out.append(task)
        return out

    def generate(
        self,
        images: list,
        task: str,
        text_inputs: list[str | None] | None = None,
        max_new_tokens: int = 1024,
        num_beams: int = 3,
        **gen_kwargs: Any,
    ) -> list[str]:
        """Raw decoded texts, special and location tokens kept (what post_process_generation parses).
        No token scores are kept (they cost (images x beams) x vocab floats per generated token)."""
        return self._generate(images, task, text_inputs, max_new_tokens, num_beams, False, **gen_kwargs)

    def generate_scored(
        self,
        images: list,
        task: str,
        text_inputs: list[str | None] | None = None,
        max_new_tokens: int = 1024,
        num_beams: int = 3,
        **gen_kwargs: Any,
    ) -> list["Generated"]:
        """generate, keeping the log-probability of every generated token (annotators.florence2_scores):
        transformers' compute_transition_scores, through beam_indices under beam search. Memory: generate
        holds (images x beams) x vocab scores per generated token until the batch ends."""
        return self._generate(images, task, text_inputs, max_new_tokens, num_beams, True, **gen_kwargs)

    def _generate(self, images: list, task: str, text_inputs, max_new_tokens: int, num_beams: int, scored: bool,
                  **gen_kwargs: Any) -> list:
        import torch

        from annotators.florence2_scores import from_generation

        if not images:
            return []
        prompts = self.prompts(task, len(images), text_inputs)
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        positions = self.model.config.text_config.max_position_embeddings
        if inputs["input_ids"].shape[1] > positions:
            raise ValueError(
                f"{task}: prompt of {inputs['input_ids'].shape[1]} tokens (image tokens included) exceeds the "
                f"model's {positions} positions; shorten the text input"
            )
        max_new_tokens = min(max_new_tokens, self.token_limits.get(task, max_new_tokens), positions)  # BART's positions end there
        dtype = next(self.model.parameters()).dtype
        tokenizer = self.processor.tokenizer
        n_tokens = len(tokenizer)
        vocab = self.model.config.text_config.vocab_size
        if vocab > n_tokens:  # padded embedding rows have no token: never generate them (caller's list kept)
            gen_kwargs["suppress_tokens"] = sorted(set(gen_kwargs.get("suppress_tokens") or ()) | set(range(n_tokens, vocab)))
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=inputs["input_ids"].to(self.device),
                pixel_values=inputs["pixel_values"].to(self.device, dtype),
                attention_mask=inputs["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                output_scores=scored,
                return_dict_in_generate=True,
                **gen_kwargs,
            )
            if not scored:
                logprobs = None
            else:
                beams = getattr(out, "beam_indices", None)
            # greedy: scores are the processed logits (normalised here); beam search: already log-probs
                logprobs = self.model.compute_transition_scores(
                    out.sequences, out.scores, beams, normalize_logits=beams is None
                ).float().cpu()
        ids = out.sequences.cpu()
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        # <pad> after </s> is batch padding, not generation: post_process_generation keeps it in
        # pure-text answers (captions would end in "<pad><pad>"), so drop it here.
        pad = tokenizer.pad_token
        texts = [t.replace(pad, "") for t in texts] if pad else texts
        if logprobs is None:
            return texts
        first = ids.shape[1] - logprobs.shape[1]  # the decoder start token(s) have no score
        return [
            from_generation(self.processor.post_processor, ids[i, first:].tolist(), logprobs[i].tolist(),
                            tokenizer.eos_token_id, tokenizer.pad_token_id, texts[i])
            for i in range(len(texts))
        ]

    def parse(self, text: str, task: str, image_size: tuple[int, int]) -> dict:
        """processor.post_process_generation: {task: answer} with coordinates in pixels of image_size (w, h)."""
        return self.processor.post_process_generation(text=text, task=task, image_size=tuple(image_size))

    def run(self, images: list, task: str, text_inputs: list[str | None] | None = None, **gen_kwargs: Any) -> list[dict]:
        """generate + parse, one {task: answer} per image, in that image's pixel coordinates."""
        texts = self.generate(images, task, text_inputs, **gen_kwargs)
        return [self.parse(t, task, im.size) for t, im in zip(texts, images)]

    def save(self, directory: str | Path) -> None:
        """save_pretrained of model and processor: a local dir `load()` reads back exactly."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
