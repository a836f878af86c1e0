"""Fast action decoding for OpenVLA-style policies: a static KV cache, and CUDA graphs for the
decode steps.

``TokenVLAPolicy.act`` decodes exactly ``action_tokens`` tokens: one prefill over image + prompt,
then ``action_tokens - 1`` single-token steps. At small batches a 7B model's decode step costs
far more in Python and kernel launches than in weight reads, so the steps are recorded once as a
CUDA graph and replayed (measurements: docs/benchmarks.md).

What this module does differently from the backbone's own forward (and nothing else):
* the prefill and the decode steps run the Llama's own layers (``embed`` -> rotary ->
  ``layers`` -> ``norm``, the modules a PEFT wrapper patched included) with an explicit boolean
  4-D mask and ``StaticKV`` as ``past_key_values`` (it only implements ``update``, the one method
  a transformers attention layer calls), so no transformers cache or mask-building code runs;
* the cache is preallocated: [B, heads, L_max, head_dim] per layer, L_max = prompt length +
  action tokens - 1 rounded up to ``LENGTH_BUCKET``; decode step k writes position L + k and
  attends to the positions <= L + k that are not left padding;
* ``cuda_graph``: one graph per (batch, L_max, active adapters, temperature, train/eval mode,
  the addresses of the parameters it reads) replays a decode step; its inputs (token, position,
  write index, key mask) live in fixed buffers that are filled before each replay. Sampling runs
  outside the graph. Parameters of inactive LoRA adapters are not part of the key, so creating the
  old-policy adapter at a task boundary does not invalidate the trainable adapter's graphs.
Left-padding query rows in the prefill attend to themselves only (their outputs are never read);
real rows see exactly what they see in the teacher-forced forward, so log-probs match
``evaluate`` (tests/test_openvla_decode.py).

Memory: the caches of the ``KEPT_SHAPES`` most recently used (batch, L_max) are kept between calls
(a graph reads fixed addresses): 2 x layers x B x L_max x hidden x bytes each, ~2.4 GB for a 7B
model at batch 16 and L_max 304 in bf16. Acting, the next-value and the anchor-target passes use
the acting batch (``modules/policy/base.py`` ``act_in_chunks``), so they share one cache per
prompt-length bucket. ``release()`` frees them (and the graphs).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from modules.policy.openvla.modeling import padding_safe_mask
from modules.timing import phase

LENGTH_BUCKET = 16  # cache lengths are rounded up to this (prompts of similar length share a graph)
KEPT_SHAPES = 4  # caches (and their graphs) kept for this many recent (batch, L_max, dtype, device)
MODES = ("dynamic", "static", "cuda_graph")


def _read_by(name: str, adapters: tuple) -> bool:
    """Whether the decode step reads parameter ``name``: the base weights and the active adapters'."""
    marker = next((m for m in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
                   if m in name), None)
    return marker is None or name.split(marker, 1)[1].split(".", 1)[0] in adapters


class StaticKV:
    """Preallocated K/V for every layer. Prefill (several query tokens) writes positions [0, L);
    a decode step (one query token) writes position ``write_at`` (a device tensor, so one
    captured graph serves every step) and returns the whole buffer."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.batch, self.length = batch, length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        n = key.shape[2]
        if n == 1:
            keys.index_copy_(2, self.write_at, key)
            values.index_copy_(2, self.write_at, value)
            return keys, values
        keys[:, :, :n].copy_(key)
        values[:, :, :n].copy_(value)
        return key, value  # the prefill attends to its own keys only

    def get_seq_length(self, layer_idx: int = 0) -> int:  # never consulted on this path; for safety
        return 0


def _run_layers(lm, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: StaticKV) -> torch.Tensor:
    """The Llama's decoder stack on input embeddings ``x`` (as ``LlamaModel.forward`` runs it)."""
    rotary = lm.rotary_emb(x, positions)
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        out = layer(x, attention_mask=mask, position_ids=positions, past_key_values=kv, use_cache=True,
                    position_embeddings=rotary)
        x = out[0] if isinstance(out, tuple) else out
    return lm.norm(x)


class _Shape:
    """The cache and the graphs' fixed input buffers for one (batch, L_max, dtype, device)."""

    def __init__(self, lm, batch: int, length: int, dtype, device):
        cfg = lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = StaticKV(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, head_dim, dtype, device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # action-bin index fed to the step
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)  # its rotary position
        self.key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)  # False on left padding
        self.arange = torch.arange(length, device=device)
        self.graphs: dict = {}  # key -> (CUDAGraph, output log-probs buffer)


class StaticDecoder:
    """The static-cache / CUDA-graph decode path of one ``TokenVLAPolicy`` (not an nn.Module:
    it holds no parameters and is never saved; copies start empty)."""

    def __init__(self, policy, mode: str = "static", compile_step: bool = False):
        if mode not in ("static", "cuda_graph"):
            raise ValueError(f"decoding mode {mode!r}: 'static' or 'cuda_graph'")
        self.policy, self.mode, self.compile_step = policy, mode, compile_step
        self._shapes: OrderedDict = OrderedDict()  # (batch, L_max, dtype, device) -> _Shape, oldest first
        self._compiled = None
        self.captures = 0  # graphs recorded (tests and benchmarks read it)

    def __deepcopy__(self, memo):  # frozen copies of the policy (full fine-tuning) start with no cache
        return StaticDecoder(memo.get(id(self.policy), self.policy), self.mode, self.compile_step)

    def __getstate__(self):
        return {"policy": self.policy, "mode": self.mode, "compile_step": self.compile_step}

    def __setstate__(self, state):
        self.__init__(state["policy"], state["mode"], state["compile_step"])

    def release(self) -> None:
        """Free the kept KV caches and graphs."""
        self._shapes.clear()

    @property
    def kept_batch(self) -> int | None:
        """The batch of the most recently used cache (the acting batch), or None."""
        return next(reversed(self._shapes))[0] if self._shapes else None

    # -- parts of the backbone -------------------------------------------------------------
    @property
    def _vlm(self):
        vlm = self.policy.backbone.vlm
        if not (hasattr(vlm, "embed") and hasattr(vlm, "language_model")):
            raise ValueError(f"model.policy.init_args.decoding={self.mode!r} needs a backbone whose model has "
                             f"embed() and a Llama language_model (OpenVLABackbone); "
                             f"{type(self.policy.backbone).__name__} has not: use decoding: dynamic")
        return vlm

    def _prepare(self, lm, batch: int, length: int, dtype, device) -> _Shape:
        key = (batch, length, dtype, device)
        if key in self._shapes:
            self._shapes.move_to_end(key)
        else:
            while len(self._shapes) >= KEPT_SHAPES:  # free the oldest before allocating
                self._shapes.popitem(last=False)
            self._shapes[key] = _Shape(lm, batch, length, dtype, device)
        return self._shapes[key]

    def _step_fn(self):
        if not self.compile_step:
            return self._step
        if self._compiled is None:
            self._compiled = torch.compile(self._step)  # batch becomes dynamic after a recompile
        return self._compiled

    def _step(self, lm, shape: _Shape) -> torch.Tensor:
        """One decode step from the fixed buffers: log-probs over the action bins [B, bins]."""
        x = lm.embed_tokens(self.policy.action_ids[shape.token].unsqueeze(1))
        mask = ((shape.arange <= shape.kv.write_at) & shape.key_mask)[:, None, None, :]
        hidden = _run_layers(lm, x, mask, shape.position, shape.kv)[:, -1]
        return torch.log_softmax(self.policy._action_logits(hidden), -1)

    def _graph_key(self, lm, shape: _Shape):
        from peft import PeftModel

        model = self.policy.backbone.model
        adapters = tuple(model.active_adapters) if isinstance(model, PeftModel) else ()
        params = tuple(p.data_ptr() for name, p in lm.named_parameters() if _read_by(name, adapters)) + (
            model.get_output_embeddings().weight.data_ptr(),)
        return (adapters, self.policy.temperature, lm.training, hash(params))

    def _replay_or_capture(self, lm, shape: _Shape) -> torch.Tensor:
        key = self._graph_key(lm, shape)
        entry = shape.graphs.get(key)
        if entry is None:
            with phase("compile_capture"):
                entry = self._capture(lm, shape, key)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, lm, shape: _Shape, key):
        """Record one decode step as a CUDA graph (compiling it first with ``compile_decode``)."""
        step = self._step_fn()
        # warm-up on a side stream (allocator and library handles), as torch.cuda.graphs asks;
        # it writes the cache at write_at, which the real step overwrites
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(lm, shape)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(lm, shape)
        entry = shape.graphs[key] = (graph, out)
        self.captures += 1
        return entry

    # -- acting -----------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, pixel_values: torch.Tensor, prompts, greedy: bool):
        """-> (tokens [B, n], token log-probs [B, n, bins], last hidden states of the prompt [B, L, H])."""
        from modules.policy.backbone import positions_from_mask

        policy, vlm = self.policy, self._vlm
        lm = vlm.language_model
        n = policy.action_tokens
        ids, mask = prompts.input_ids, prompts.attention_mask.bool()
        batch, length = ids.shape
        embeds = vlm.embed(ids, pixel_values)
        cache_len = -(-(length + n - 1) // LENGTH_BUCKET) * LENGTH_BUCKET
        shape = self._prepare(lm, batch, cache_len, embeds.dtype, embeds.device)
        positions = positions_from_mask(prompts.attention_mask)
        # prefill: causal and not left padding; a padding row attends to itself (never read)
        hidden = _run_layers(lm, embeds, padding_safe_mask(mask, length), positions, shape.kv)
        shape.key_mask[:, :length].copy_(mask)
        shape.key_mask[:, length:] = True
        use_graph = self.mode == "cuda_graph" and embeds.is_cuda
        step = self._step_fn()
        tokens, logps = [], []
        logp = torch.log_softmax(policy._action_logits(hidden[:, -1]), -1)
        for k in range(n):
            tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(-1)
            tokens.append(tok)
            logps.append(logp)
            if k + 1 < n:
                shape.token.copy_(tok)
                shape.position.copy_(positions[:, -1:] + 1 + k)
                shape.kv.write_at.fill_(length + k)
                logp = (self._replay_or_capture(lm, shape) if use_graph else step(lm, shape)).clone()
        return torch.stack(tokens, 1), torch.stack(logps, 1), hidden
