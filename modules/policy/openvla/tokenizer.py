"""OpenVLA's tokenizer: read verbatim from a checkpoint's tokenizer.json, or built offline with
the Llama-2 layout for tiny models and tests.

The layout OpenVLA's checkpoints rely on: 32000 base ids with <unk> 0, <s> 1 (BOS),
</s> 2; byte-fallback pieces <0x00>..<0xFF> at 3..258 (so "\\n" is 13); "▁" (the empty piece
OpenVLA appends after "Out:") at 29871; the last 256 base ids, 31744..31999, are the action
tokens; <PAD> is an added token, id 32000. The pipeline is Llama-2's tokenizer.json one:
normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback.
"""
from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from modules.policy.openvla.config import LLAMA_BASE_VOCAB

SPACE_PIECE, SPACE_ID = "▁", 29871
PROMPT_PIECES = ["▁In", "▁What", "▁action", "▁should", "▁the", "▁robot", "▁take", "▁to", "Out"]


def llama_layout_tokenizer(words: list[str] = ()) -> PreTrainedTokenizerFast:
    """A 32000-id BPE tokenizer with Llama-2's special ids, byte fallback, "▁" at 29871 and the
    prompt's words (plus ``words``) as whole pieces; other text falls back to characters/bytes."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in map(chr, range(33, 127)):
        vocab.setdefault(c, len(vocab))
    merges = []
    pieces = PROMPT_PIECES + [SPACE_PIECE + w for s in words for w in s.lower().split()]
    for piece in dict.fromkeys(pieces):  # every prefix is a piece: merges only ever extend a word's start
        for k in range(2, len(piece) + 1):
            if piece[:k] not in vocab:
                vocab[piece[:k]] = len(vocab)
                merges.append((piece[:k - 1], piece[k - 1]))
    if len(vocab) >= SPACE_ID:
        raise ValueError(f"too many words for a Llama-layout tokenizer ({len(vocab)} pieces)")
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), SPACE_ID)})  # never produced
    vocab[SPACE_PIECE] = SPACE_ID
    vocab.update({chr(0x4E00 + i): i for i in range(SPACE_ID + 1, LLAMA_BASE_VOCAB)})  # rare characters
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<PAD>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<PAD>")


def load_tokenizer(path: str, key: str) -> PreTrainedTokenizerFast:
    """The checkpoint's tokenizer.json as is (its special tokens from tokenizer_config.json /
    special_tokens_map.json); ``pad`` defaults to OpenVLA's <PAD>."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{key}={path!r}: no tokenizer.json (the kit reads the fast tokenizer file only)")
    tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None and "<PAD>" in tok.get_vocab():
        tok.pad_token = "<PAD>"
    if tok.bos_token_id != 1 or tok.convert_ids_to_tokens(SPACE_ID) != SPACE_PIECE:
        raise ValueError(f"{key}={path!r}: tokenizer is not Llama-2's layout (BOS id {tok.bos_token_id}, "
                         f"id {SPACE_ID} = {tok.convert_ids_to_tokens(SPACE_ID)!r})")
    return tok
