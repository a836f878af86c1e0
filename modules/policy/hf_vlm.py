"""A backbone for any transformers image-text-to-text model: a checkpoint from a local directory
(``pretrained: /dir``) or a tiny random model of a family built from a config (``config:``).

What differs between families (prompt layout, image placeholder count, attention) sits in
``FAMILIES``, keyed by ``config.model_type``. Every family keeps the layout the policy needs:
the image placeholders come before the instruction. Nothing is ever downloaded.

PaliGemma's attention: its Gemma is built with ``use_bidirectional_attention=True``, and where
transformers can skip the mask (a batch without padding) the whole sequence attends
bidirectionally, while a left-padded batch gets a causal mask: the same row would see different
attention in different batches. So every prefill / full forward passes ``token_type_ids``, which
makes transformers build the mask; ``attention`` picks the mask (decode steps are causal anyway):
  causal - plain causal;
  image  - the image tokens attend to each other bidirectionally (PaliGemma was pretrained with
           its image block bidirectional), the text causally: phi(s) still never reads the
           instruction (the default);
  prefix - PaliGemma's pretraining prefix-LM: image + prompt bidirectional, action tokens
           causal; phi(s) then reads the instruction.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modules.policy.backbone import VLMBackbone, positions_from_mask

KEY = "model.policy.init_args.backbone.init_args"
ATTENTION = ("causal", "image", "prefix")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TinySizes:
    """The ``config:`` knobs of a tiny random model (besides ``family``)."""

    words: tuple = ()  # instructions (or words) the word-level tokenizer must know
    action_bins: int = 3  # the tokenizer's base vocabulary ends with this many action tokens
    image_size: int = 56
    patch_size: int = 8
    hidden_size: int = 32
    layers: int = 2
    heads: int = 2
    kv_heads: int | None = None  # None: = heads
    vision_hidden_size: int = 32
    vision_layers: int = 1
    scale_factor: int = 2  # Idefics3/SmolVLM pixel shuffle
    initializer_range: float = 0.02


@dataclass(frozen=True)
class Family:
    template: str  # the text after the image; {instruction} is the task
    after: str = ""  # appended after the template, tokenized on its own (PaliGemma: the "\n" separator)
    specials: tuple = ("<image>",)  # tokens the family's tokenizer adds (tiny builds)
    prefix_lm: bool = False  # token_type_ids / bidirectional blocks (PaliGemma)
    position_offset: int = 0  # PaliGemma counts positions from 1 (its own default position_ids)
    image_dims: int = 4  # Idefics3/SmolVLM take [B, num_images, 3, H, W]
    frozen: tuple = ()  # parameters the forward never uses (DDP needs a gradient for each trainable one)


IDEFICS_SPECIALS = ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>")
FAMILIES = {
    # image tokens, then BOS + text + "\n" (PaliGemmaProcessor); pi0 prompts with the bare task
    "paligemma": Family("{instruction}", after="\n", prefix_lm=True, position_offset=1),
    # BOS + image tokens + text, with OpenVLA's prompt; Llava reads the vision tower's hidden
    # states, never its post_layernorm
    "llava": Family("In: What action should the robot take to {instruction}?\nOut:",
                    frozen=("vision_tower.post_layernorm",)),
    # BOS User:<fake><global-img><image>*n<fake> text<end_of_utterance>\nAssistant: - one
    # global image (no splitting), so the placeholder count is fixed
    "idefics3": Family("{instruction}", after="<end_of_utterance>\nAssistant:", specials=IDEFICS_SPECIALS,
                       image_dims=5),
    "smolvlm": Family("{instruction}", after="<end_of_utterance>\nAssistant:", specials=IDEFICS_SPECIALS,
                      image_dims=5),
}


def _fail(what: str, value, why: str) -> ValueError:
    return ValueError(f"{KEY}.{what}={value!r}: {why}")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # "\n" stays a token (PaliGemma's prompt separator); spaces split; punctuation is its own token
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                    pre_tokenizers.Split(Regex("[ \t]+"), "removed"), pre_tokenizers.Punctuation()])


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def word_tokenizer(texts: list[str], action_bins: int, specials: tuple) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of ``texts``, offline: Gemma's special ids (pad 0,
    eos 1, bos 2, unk 3), then the words, then ``action_bins`` action tokens closing the base
    vocabulary; the family's special tokens (``<image>``...) are added after it, as in the real
    tokenizers."""
    for s in specials:
        texts = [t.replace(s, " ") for t in texts]
    words = {w for t in texts for w, _ in _pre_tokenizer().pre_tokenize_str(t.lower())}
    vocab = {}
    for w in ["<pad>", "<eos>", "<bos>", "<unk>", "\n"] + sorted(words) + [f"<act_{i}>" for i in range(action_bins)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    names = {"<image>": "image_token", "<fake_token_around_image>": "fake_image_token",
             "<global-img>": "global_image_token", "<end_of_utterance>": "end_of_utterance_token"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", extra_special_tokens={names[s]: s for s in specials})


def _tiny_model_config(family: str, s: TinySizes, vocab: int, image_token_id: int):
    import transformers as tf

    vision = {"hidden_size": s.vision_hidden_size, "intermediate_size": 4 * s.vision_hidden_size,
              "num_hidden_layers": s.vision_layers, "num_attention_heads": s.heads, "image_size": s.image_size,
              "patch_size": s.patch_size, "initializer_range": s.initializer_range}
    text = {"vocab_size": vocab, "hidden_size": s.hidden_size, "intermediate_size": 4 * s.hidden_size,
            "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads or s.heads, "head_dim": s.hidden_size // s.heads,
            "max_position_embeddings": 512, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "initializer_range": s.initializer_range}
    if family == "paligemma":
        return tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**vision, vision_use_head=False),
                                  text_config=tf.GemmaConfig(**text), image_token_index=image_token_id,
                                  projection_dim=s.hidden_size, hidden_size=s.hidden_size, vocab_size=vocab)
    side = s.image_size // s.patch_size
    if side % s.scale_factor:
        raise _fail("config.scale_factor", s.scale_factor, f"must divide image_size/patch_size = {side}")
    vision_cls, cls = ((tf.Idefics3VisionConfig, tf.Idefics3Config) if family == "idefics3"
                       else (tf.SmolVLMVisionConfig, tf.SmolVLMConfig))
    return cls(vision_config=vision_cls(**vision), text_config=tf.LlamaConfig(**text),
               image_token_id=image_token_id, scale_factor=s.scale_factor, pad_token_id=0)


def _tiny_processor(family: str, tokenizer, image_size: int, image_tokens: int):
    """The family's processor, so that a saved tiny model is a directory like a real checkpoint's
    (SmolVLM's processor also needs num2words and torchvision: it gets the image processor alone).
    The PIL image processors: only their settings are used (``preprocess`` works on tensors)."""
    import transformers

    def pil(name):
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)

    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255}
    if family == "paligemma":
        ip = pil("SiglipImageProcessor")(size={"height": image_size, "width": image_size},
                                         image_seq_length=image_tokens, **norm)
        return transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)
    ip = pil("Idefics3ImageProcessor" if family == "idefics3" else "SmolVLMImageProcessor")(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
        **norm)
    if family == "idefics3":
        return transformers.Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=image_tokens)
    return ip


class HFVisionLanguageBackbone(VLMBackbone):
    """``pretrained``: a local checkpoint directory of any family in ``FAMILIES``; ``config``:
    ``{family: paligemma|idefics3|smolvlm, ...TinySizes}``, a tiny random model. Exactly one."""

    def __init__(self, pretrained: str | None = None, config: dict | None = None, dtype: str = "float32",
                 attention: str | None = None, prompt_template: str | None = None, seed: int | None = None):
        """
        Args:
            pretrained: a local checkpoint directory of a supported family (PaliGemma, Idefics3,
                SmolVLM, Llava); nothing is downloaded.
            config: a tiny random model instead, ``{family, ...sizes}``.
            dtype: ``float32`` (CPU) or ``bfloat16`` (GPU).
            attention: prefix-LM families only: ``image``, ``prefix`` or ``causal`` attention
                (null: the family's default).
            prompt_template: the prompt around ``{instruction}`` (null: the family's default).
            seed: seed of a tiny model's random weights.
        """
        super().__init__()
        self.source = pretrained
        if (pretrained is None) == (config is None):
            raise ValueError(f"{KEY}: give exactly one of pretrained (a local directory) or config "
                             f"(a tiny model), got pretrained={pretrained!r}, config={config!r}")
        if dtype not in DTYPES:
            raise _fail("dtype", dtype, f"must be one of {sorted(DTYPES)}")
        self.processor, self.image_processor = None, None
        if pretrained is not None:
            self._load(pretrained, DTYPES[dtype])
        else:
            self._build(dict(config), seed)
            self.model.to(DTYPES[dtype])
        self.family_name = self.model.config.model_type
        self.family = FAMILIES[self.family_name]
        allowed = ATTENTION if self.family.prefix_lm else ("causal",)  # the others are causal LMs
        self.attention = attention or ("image" if self.family.prefix_lm else "causal")
        if self.attention not in allowed:
            raise _fail("attention", attention, f"{self.family_name} supports {', '.join(allowed)}")
        self.template = prompt_template or self.family.template
        if self.template.count("{instruction}") != 1:
            raise _fail("prompt_template", self.template, "must contain {instruction} exactly once")
        self.image_token_id = self.model.config.image_token_id
        self._prefix_end_id = self._ids(self.family.after)[-1] if self.family.after else None
        vc = self.model.config.vision_config
        self.image_size = vc.image_size
        self._image_tokens = (self.image_size // vc.patch_size) ** 2
        if self.family.image_dims == 5:  # pixel shuffle merges scale_factor^2 patches into one token
            self._image_tokens //= self.model.config.scale_factor ** 2
        if self.family_name == "llava" and self.model.config.vision_feature_select_strategy == "full":
            self._image_tokens += 1  # CLS kept
        self._image_norm()
        for name, p in self.model.named_parameters():
            if any(f in name for f in self.family.frozen):
                p.requires_grad_(False)

    # -- construction -----------------------------------------------------------------------
    def _load(self, path: str, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        if not os.path.isdir(path):
            raise _fail("pretrained", path, "no such directory (a local checkpoint directory; nothing is downloaded)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise _fail("pretrained", path, "no config.json there (not a transformers checkpoint directory)")
        with open(os.path.join(path, "config.json")) as f:  # before loading any weights
            model_type = json.load(f).get("model_type")
        if model_type not in FAMILIES:
            raise _fail("pretrained", path, f"model_type {model_type!r} has no prompt format here "
                                            f"(supported: {', '.join(FAMILIES)})")
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:  # missing weights, unknown model type...
            raise _fail("pretrained", path, f"cannot load the model offline: {_first_line(err)}") from None
        try:  # the processor, where it can be built (SmolVLM's also wants num2words and torchvision)
            proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (ImportError, OSError, ValueError):
            proc = None
        self.processor = proc if hasattr(proc, "tokenizer") and hasattr(proc, "image_processor") else None
        try:
            self.tokenizer = self.processor.tokenizer if self.processor else AutoTokenizer.from_pretrained(
                path, local_files_only=True)
            if self.processor:
                self.image_processor = self.processor.image_processor
            elif os.path.isfile(os.path.join(path, "preprocessor_config.json")):
                self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise _fail("pretrained", path, f"cannot load its tokenizer offline: {_first_line(err)}") from None

    def _build(self, config: dict, seed: int | None) -> None:
        family = config.pop("family", None)
        if family not in ("paligemma", "idefics3", "smolvlm"):
            raise _fail("config.family", family, "must be paligemma, idefics3 or smolvlm "
                                                  "(the tiny Llava is modules.policy.TinyLlava)")
        known = {f.name for f in fields(TinySizes)}
        for k, v in config.items():
            if k not in known:
                raise _fail(f"config.{k}", v, f"unknown key (known: family, {', '.join(sorted(known))})")
        s = TinySizes(**config)
        fam = FAMILIES[family]
        texts = [*s.words, fam.template.replace("{instruction}", " "), fam.after, "User:"]
        self.tokenizer = word_tokenizer(texts, s.action_bins, fam.specials)
        side = s.image_size // s.patch_size
        n_img = side * side // (s.scale_factor ** 2 if fam.image_dims == 5 else 1)
        proc = _tiny_processor(family, self.tokenizer, s.image_size, n_img)
        self.processor = proc if hasattr(proc, "tokenizer") else None
        self.image_processor = getattr(proc, "image_processor", proc)
        image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        model_config = _tiny_model_config(family, s, len(self.tokenizer), image_token_id)
        from transformers import AutoModelForImageTextToText

        # seed=None: the global RNG (train.py's --seed); an int: the same weights every time
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            self.model = AutoModelForImageTextToText.from_config(model_config)

    def _image_norm(self) -> None:
        """Rescale and mean/std from the image processor where there is one; else SigLIP's
        (x/255 - 0.5) / 0.5."""
        ip = self.image_processor
        mean, std = getattr(ip, "image_mean", None) or [0.5] * 3, getattr(ip, "image_std", None) or [0.5] * 3
        scale = getattr(ip, "rescale_factor", None) or 1 / 255
        self.register_buffer("_scale", torch.tensor(std).mul(1 / scale).view(3, 1, 1), persistent=False)
        self.register_buffer("_mean", torch.tensor(mean).mul(1 / scale).view(3, 1, 1), persistent=False)

    def save_pretrained(self, path: str) -> None:
        """The model and its processor (or tokenizer + image processor): a directory that
        ``pretrained:`` loads back."""
        if hasattr(self.model, "get_base_model"):
            raise RuntimeError("save_pretrained before LoRA is applied (PEFT saves the adapters itself)")
        self.model.save_pretrained(path)
        for part in (self.processor,) if self.processor is not None else (self.tokenizer, self.image_processor):
            if part is not None:
                part.save_pretrained(path)

    # -- the VLMBackbone interface ------------------------------------------------------------
    def prompt(self, instruction: str) -> str:
        return self.template.format(instruction=instruction) + self.family.after

    @property
    def image_token_count(self) -> int:
        return self._image_tokens

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(x, size=self.image_size, mode="bilinear", antialias=True)
        x = ((x - self._mean) / self._scale).to(self.vlm.dtype)
        return x.unsqueeze(1) if self.family.image_dims == 5 else x

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _image_block(self) -> list[int]:
        """Everything before the text: the family's layout around the image placeholders."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        image = [self.image_token_id] * self.image_token_count
        if self.family_name == "paligemma":
            return image + bos
        if self.family.image_dims == 5:
            p = self.processor  # the processor's token strings where it has them
            fake = self.tokenizer.convert_tokens_to_ids(getattr(p, "fake_image_token", "<fake_token_around_image>"))
            glob = self.tokenizer.convert_tokens_to_ids(getattr(p, "global_image_tag", "<global-img>"))
            return bos + self._ids("User:") + [fake, glob] + image + [fake]
        return bos + image

    def _tokenize_one(self, instruction: str) -> tuple[list[int], list[bool]]:
        if instruction not in self._prompt_cache:
            text = self.template.format(instruction=instruction)
            start = text.find(instruction)
            end = start + len(instruction)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            goal = [s < end and e > start for s, e in enc["offset_mapping"]]
            # the family's separator on its own, so the prompt always ends with the same ids
            head, tail = self._image_block(), self._ids(self.family.after) if self.family.after else []
            self._prompt_cache[instruction] = (head + enc["input_ids"] + tail,
                                               [False] * len(head) + goal + [False] * len(tail))
        return self._prompt_cache[instruction]

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """PaliGemma's token_type_ids: 0 = the bidirectional block, 1 = causal."""
        if self.attention == "causal":
            return torch.ones_like(input_ids)
        if self.attention == "image":
            return (input_ids != self.image_token_id).long()
        # prefix: everything up to the prompt's closing separator; after it the action tokens
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(input_ids == self._prefix_end_id, idx, -1).amax(1, keepdim=True)
        return (idx > last).long()

    def forward(self, input_ids, attention_mask, pixel_values=None, position_ids=None,
                past_key_values=None, use_cache=False):
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        extra = {}
        if self.family.prefix_lm and past_key_values is None:  # decode steps: causal anyway
            extra["token_type_ids"] = self._token_types(input_ids)
        out = self.vlm(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                       position_ids=position_ids + self.family.position_offset, past_key_values=past_key_values,
                       use_cache=use_cache, **extra)
        return out.last_hidden_state, out.past_key_values
