"""Tokenizer and text-encoder helpers for the inpainting diffusion model.

The tiny base ships a CLIP BPE tokenizer whose vocabulary is generated in code
(:func:`write_tiny_vocab`): every byte is a token (so any prompt tokenizes), and merges
turn each word of the prompt vocabulary into a single token (so prompts stay short).
It loads with ``CLIPTokenizer.from_pretrained(local_dir)`` exactly like SD's tokenizer.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable, List, Sequence

import torch
import torch.nn.functional as F

# Words of the prompts the project uses (procedural kinds, the published datasets' clinical
# text). Words outside this list still tokenize, byte by byte.
PROMPT_WORDS = (
    "a an the of with in on and or no without near small large flat raised round oval irregular "
    "colonoscopy endoscopy endoscopic image photo view frame polyp polyps adenoma lesion lesions "
    "mucosa mucosal colon colonic gastrointestinal normal healthy tissue background wall fold folds "
    "fundus retinal retina optic disc cup glaucoma vessels vessel "
    "dermoscopy dermoscopic skin melanoma nevus mole pigmented "
    "ultrasound breast sonographic hypoechoic mass tumor tumour benign malignant speckle "
    "medical clinical scan region area texture red pink dark bright brown sessile pedunculated smooth surface "
    "showing photograph color colour well defined border irregular posterior acoustic shadowing enhancement"
).split()

START, END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte -> printable unicode map (same table CLIPTokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tiny_vocab(out_dir: str | Path, words: Iterable[str] = PROMPT_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for a small CLIP BPE tokenizer.

    Args:
        out_dir: folder to write into (created).
        words: words that should become single tokens (lower-case ASCII).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: List[str] = chars + [c + "</w>" for c in chars]
    merges: List[str] = []
    seen = set(vocab)
    # Words, digits and single punctuation followed by end-of-word are covered by the byte tokens;
    # each word gets a left-to-right merge chain ending in "word</w>".
    for word in sorted(set(w.lower() for w in words) | set(string.digits)):
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in seen:
                merges.append(f"{left} {right}")
                vocab.append(merged)
                seen.add(merged)
            left = merged
    vocab += [START, END]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def legacy_special_tokens(folder: str | Path) -> dict:
    """The special tokens a tokenizer folder stores in the older ``{"__type": "AddedToken", ...}`` form, as
    ``tokenizers.AddedToken`` objects to pass to ``from_pretrained``.

    The published SD tokenizer configs store their special tokens so. Read as they are, the tokenizers
    library takes each such dict as keyword arguments and prints "Ignored unknown kwarg option __type" on
    every load; passed as objects, the same tokens (content, strip and normalisation flags) load silently.
    """
    from tokenizers import AddedToken

    tokens = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's entries win
        file = Path(folder) / name
        config = json.loads(file.read_text()) if file.is_file() else {}
        for key, value in config.items():
            if isinstance(value, dict) and value.get("__type") == "AddedToken":
                tokens[key] = AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    return tokens


def build_tiny_tokenizer(out_dir: str | Path, model_max_length: int = 32):
    """Generate the vocabulary in ``out_dir`` and load it as a ``CLIPTokenizer``.

    Args:
        out_dir: folder for vocab.json / merges.txt (and, after ``save_pretrained``, its configs).
        model_max_length: padded prompt length L.

    Returns:
        A ``transformers.CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    write_tiny_vocab(out_dir)
    # from_pretrained reads vocab.json/merges.txt the same way in transformers 4 and 5
    # (their constructors differ), and it is the path a user's SD tokenizer takes too.
    return CLIPTokenizer.from_pretrained(
        str(out_dir), local_files_only=True, model_max_length=model_max_length,
        bos_token=START, eos_token=END, unk_token=END, pad_token=END,
    )


@torch.no_grad()
def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Pad/truncate prompts to the tokenizer's max length.

    Returns:
        input ids, int64 (B, L).
    """
    out = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return out.input_ids


def encode_text(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Encode prompts to the per-token hidden states the UNet cross-attends to.

    Args:
        tokenizer: CLIP tokenizer.
        text_encoder: ``CLIPTextModel`` (SD-1.5 / SD-2 / tiny).
        prompts: B strings ("" is the null prompt).

    Returns:
        text embedding, float (B, L, D) on the encoder's device.
    """
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


def encode_text_sdxl(tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str]) -> torch.Tensor:
    """SDXL conditioning packed into one tensor, so the rest of the code handles it like SD's.

    SDXL's UNet cross-attends to the penultimate hidden states of both encoders, concatenated
    (B,L,D1+D2), and also takes the second encoder's pooled projection (B,P). The pooled vector rides
    along as one extra, zero-padded "token" at the end: classifier-free guidance, prompt tables and
    caches then work on one (B,L+1,D1+D2) tensor; :func:`unpack_sdxl` splits it again.

    Args:
        tokenizers: (CLIP tokenizer, second CLIP tokenizer).
        text_encoders: (``CLIPTextModel``, ``CLIPTextModelWithProjection``).
        prompts: B strings ("" is the null prompt).

    Returns:
        float (B, L+1, D1+D2) on the first encoder's device; requires P <= D1+D2.
    """
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenize(tokenizer, prompts).to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    pooled = out.text_embeds  # the last encoder's projection (CLIPTextModelWithProjection)
    states = torch.cat(hidden, dim=-1)
    row = F.pad(pooled, (0, states.shape[-1] - pooled.shape[-1]))[:, None]
    return torch.cat([states, row.to(states.dtype)], dim=1)


def unpack_sdxl(text_emb: torch.Tensor, pooled_dim: int):
    """Split :func:`encode_text_sdxl`'s tensor (B,L+1,D) into hidden states (B,L,D) and pooled (B,pooled_dim)."""
    return text_emb[:, :-1], text_emb[:, -1, :pooled_dim]
