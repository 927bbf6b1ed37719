"""Scorers on tiny random weights written in the released checkpoints' layouts.

The scores are meaningless; what is tested is real: the key conversions (round trip through the released
layout, and agreement with independent re-implementations of the released forward passes written directly
on the released tensor names), preprocessing, tokenization, batching, determinism and the errors.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mole.evaluate.scorers import SCORER_NAMES, Scorer, build_scorer
from mole.evaluate.scorers._common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, load_state_dict
from mole.evaluate.scorers.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardModel,
    mole_to_official,
    official_to_mole,
    text_config_from_med,
)
from mole.evaluate.scorers.openai_clip import (
    load_clip_tokenizer,
    load_openai_clip,
    openai_to_transformers,
    transformers_to_openai,
)

PROMPTS = [
    "a photo of a woman",
    "a man waving his hand",
    "two kids in a park " * 12,  # longer than 77 tokens: truncated
    "a girl &amp; a boy",
    "a close-up of a smiling lady",
]


def _images(n: int = 5, seed: int = 0) -> list[Image.Image]:
    """Random images of different sizes and modes, so resizing and cropping take different paths."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 40), (50, 36), (33, 61), (32, 32), (80, 45)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]
    images[-1] = images[-1].convert("RGBA")
    return images


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms too), so no mapping error can hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------------------------------------
# Tiny CLIPs in the OpenAI layout
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mole.tokenizer import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


def _tiny_clip(tokenizer, *, vision_width: int, vision_heads: int, hidden_act: str, seed: int):
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": hidden_act, "projection_dim": 32,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": 2,
              "num_attention_heads": vision_heads, "image_size": 32, "patch_size": 8, "hidden_act": hidden_act,
              "projection_dim": 32}  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def hps_v1_files(tmp_path_factory: pytest.TempPathFactory, clip_tokenizer_dir: Path):
    """A tiny ViT CLIP with OpenAI's 64-wide heads and QuickGELU, saved like hpc.pt."""
    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    model = _tiny_clip(tokenizer, vision_width=128, vision_heads=2, hidden_act="quick_gelu", seed=1)
    openai_sd = transformers_to_openai(model.state_dict())
    path = tmp_path_factory.mktemp("hps-v1") / "hpc.pt"
    torch.save({"state_dict": openai_sd, "epoch": 7}, path)
    return model, openai_sd, path


@pytest.fixture(scope="module")
def hps_v2_files(tmp_path_factory: pytest.TempPathFactory, clip_tokenizer_dir: Path):
    """A tiny ViT CLIP with open_clip ViT-H-14's 80-wide image heads and exact GELU, saved like HPS_v2.pt."""
    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    model = _tiny_clip(tokenizer, vision_width=160, vision_heads=2, hidden_act="gelu", seed=2)
    openai_sd = transformers_to_openai(model.state_dict())
    path = tmp_path_factory.mktemp("hps-v2") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in openai_sd.items()}}, path)
    return model, openai_sd, path


def _ref_block(x: torch.Tensor, sd: dict, p: str, heads: int, act: str, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenAI CLIP's ResidualAttentionBlock, with the very nn.MultiheadAttention it uses."""
    width = x.shape[-1]
    attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    attn.load_state_dict({k: sd[p + "attn." + k] for k in ("in_proj_weight", "in_proj_bias")} | {
        "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})  # fmt: skip
    y = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
    x = x + attn(y, y, y, need_weights=False, attn_mask=mask)[0]
    y = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
    y = F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
    y = y * torch.sigmoid(1.702 * y) if act == "quick_gelu" else F.gelu(y)
    return x + F.linear(y, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def _ref_encode_image(sd: dict, pixels: torch.Tensor, heads: int, act: str) -> torch.Tensor:
    """OpenAI CLIP's VisionTransformer.forward on its own tensor names."""
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(2):
        x = _ref_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, act, None)
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return x @ sd["visual.proj"]


def _ref_encode_text(sd: dict, ids: torch.Tensor, heads: int, act: str) -> torch.Tensor:
    """OpenAI CLIP's encode_text: causal mask, features at the argmax id (<|endoftext|>)."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(2):
        x = _ref_block(x, sd, f"transformer.resblocks.{i}.", heads, act, mask)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


def _openai_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """``clip.tokenize(prompts, truncate=True)``: 77 ids, zero-padded, <|endoftext|> last when cut."""
    ids = torch.zeros(len(prompts), 77, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens = tokenizer(p, truncation=True, max_length=77)["input_ids"]
        ids[i, : len(tokens)] = torch.tensor(tokens)
    return ids


def test_openai_layout_names_and_round_trip(hps_v1_files) -> None:
    model, openai_sd, _ = hps_v1_files
    # The released layout: fused q/k/v, projections applied as x @ proj.
    assert openai_sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 128, 128)
    assert openai_sd["visual.proj"].shape == (128, 32) and openai_sd["text_projection"].shape == (128, 32)
    assert "logit_scale" in openai_sd and "token_embedding.weight" in openai_sd
    back = openai_to_transformers(openai_sd)
    assert back.keys() == {k for k in model.state_dict() if not k.endswith("position_ids")}
    for k, v in back.items():
        assert torch.equal(v, model.state_dict()[k]), k
    with pytest.raises(ValueError, match=r"visual\.layer1"):
        openai_to_transformers({**openai_sd, "visual.layer1.0.conv1.weight": torch.zeros(1)})


def test_load_openai_clip_features_equal_original(hps_v1_files, clip_tokenizer_dir: Path) -> None:
    model, _, path = hps_v1_files
    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    loaded = load_openai_clip(path, tokenizer=tokenizer)
    assert loaded.config.vision_config.num_attention_heads == 2 and loaded.config.vision_config.image_size == 32
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(PROMPTS[:3], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img_a = model.get_image_features(pixel_values=pixels).pooler_output
        img_b = loaded.get_image_features(pixel_values=pixels).pooler_output
        txt_a = model.get_text_features(**tokens).pooler_output
        txt_b = loaded.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(img_a, img_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt_a, txt_b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "files", "heads", "act"), [("hps_v1", "hps_v1_files", 2, "quick_gelu"),
                                                              ("hps_v2", "hps_v2_files", 2, "gelu")])  # fmt: skip
def test_hps_matches_reference_forward(request, name, files, heads, act, clip_tokenizer_dir: Path) -> None:
    """The scorer equals 100 × cos of OpenAI CLIP's forward pass computed on the released tensor names."""
    _, openai_sd, path = request.getfixturevalue(files)
    scorer = build_scorer(name, {"checkpoint": str(path), "tokenizer": str(clip_tokenizer_dir)}, device="cpu")
    assert isinstance(scorer, Scorer) and scorer.name == name
    images = _images()
    scores = scorer.score(images, PROMPTS)

    sd = {k: v.float() for k, v in load_state_dict(path).items()}  # as saved (HPS v2's file is half precision)
    assert sd.keys() == openai_sd.keys()
    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    cleaned = [p.replace("&amp;", "&") for p in PROMPTS]
    with torch.no_grad():
        img = _ref_encode_image(sd, clip_preprocess(images, 32), heads, act)
        txt = _ref_encode_text(sd, _openai_ids(tokenizer, cleaned), 2, act)
    expected = 100 * F.cosine_similarity(img, txt, dim=-1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=1e-4)
    assert len(set(np.round(scores, 4))) == len(scores)  # the pairs really differ


def test_hps_batching_and_determinism(hps_v1_files, clip_tokenizer_dir: Path) -> None:
    _, _, path = hps_v1_files
    config = {"checkpoint": path, "tokenizer": clip_tokenizer_dir, "batch_size": 2}
    scorer = build_scorer("hps", config, device="cpu")
    one_batch = build_scorer("hps_v1", {**config, "batch_size": 64}, device="cpu")
    images = _images()
    first = scorer.score(images, PROMPTS)
    assert len(first) == 5 and all(math.isfinite(s) and -100 <= s <= 100 for s in first)
    assert scorer.score(images, PROMPTS) == first
    np.testing.assert_allclose(one_batch.score(images, PROMPTS), first, rtol=0, atol=1e-4)
    # One pair scored alone equals its score in a batch.
    np.testing.assert_allclose(scorer.score(images[2:3], PROMPTS[2:3]), first[2:3], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer.score(images, PROMPTS[:4])
    assert scorer.score([], []) == []


def test_hps_v2_unwraps_module_prefix_and_half(hps_v2_files, clip_tokenizer_dir: Path) -> None:
    model, _, path = hps_v2_files
    sd = load_state_dict(path)
    assert not any(k.startswith("module.") for k in sd)
    loaded = load_openai_clip(path, tokenizer=load_clip_tokenizer(clip_tokenizer_dir), vision_head_width=80,
                              hidden_act="gelu")  # fmt: skip
    assert loaded.config.vision_config.num_attention_heads == 2
    assert loaded.config.vision_config.hidden_act == "gelu" and loaded.dtype == torch.float32
    half = model.state_dict()["vision_model.encoder.layers.0.self_attn.q_proj.weight"].half().float()
    assert torch.equal(loaded.state_dict()["vision_model.encoder.layers.0.self_attn.q_proj.weight"], half)


def test_hps_accepts_transformers_folder(tmp_path: Path, hps_v1_files, clip_tokenizer_dir: Path) -> None:
    model, _, path = hps_v1_files
    folder = tmp_path / "hps-hf"
    model.save_pretrained(folder)
    load_clip_tokenizer(clip_tokenizer_dir).save_pretrained(folder)
    from_folder = build_scorer("hps_v1", {"checkpoint": folder}, device="cpu")
    from_pt = build_scorer("hps_v1", {"checkpoint": path, "tokenizer": clip_tokenizer_dir}, device="cpu")
    images = _images(3)
    np.testing.assert_allclose(from_folder.score(images, PROMPTS[:3]), from_pt.score(images, PROMPTS[:3]), atol=1e-4)


def test_clip_tokenizer_from_bpe_gz(tmp_path: Path, clip_tokenizer_dir: Path) -> None:
    """CLIP's own merges file (as shipped in clip/open_clip) gives the same ids as the tokenizer folder."""
    from mole.tokenizer import build_vocab

    vocab, merges = build_vocab()
    assert len(vocab) == 512 + len(merges) + 2  # the layout the .gz loader rebuilds
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from_gz = load_clip_tokenizer(gz)
    from_dir = load_clip_tokenizer(clip_tokenizer_dir)
    text = ["A photo of a WOMAN waving, 4k!", "zebra"]
    assert from_gz(text)["input_ids"] == from_dir(text)["input_ids"]
    assert from_gz.eos_token_id == len(vocab) - 1


# ------------------------------------------------------------------------------------------------------------
# CLIP score
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory: pytest.TempPathFactory, clip_tokenizer_dir: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPProcessor

    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    model = _tiny_clip(tokenizer, vision_width=64, vision_heads=1, hidden_act="quick_gelu", seed=3)
    folder = tmp_path_factory.mktemp("clip-model")
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score(clip_model_dir: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    scorer = build_scorer("clip", {"clip": {"model": str(clip_model_dir), "batch_size": 2}}, device="cpu")
    images = _images()
    scores = scorer.score(images, PROMPTS)
    assert all(0.0 <= s <= 100.0 for s in scores)
    model = CLIPModel.from_pretrained(clip_model_dir).eval()
    inputs = CLIPProcessor.from_pretrained(clip_model_dir)(
        text=PROMPTS, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = (100 * F.cosine_similarity(img, txt.pooler_output, dim=-1)).clamp(min=0)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# ImageReward
# ------------------------------------------------------------------------------------------------------------

_BERT_WORDS = (
    "a an the of photo man woman girl boy kid kids lady dog park in with two close up smiling waving his hand"
)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory: pytest.TempPathFactory):
    """A tiny ImageReward saved in the released key layout, with its med_config.json and BERT vocab."""
    from transformers import BertTokenizer, BlipVisionConfig

    root = tmp_path_factory.mktemp("imagereward")
    (root / "bert").mkdir()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (root / "bert" / "vocab.txt").write_text("\n".join([*specials, *_BERT_WORDS.split(), "-", "&", ";"]) + "\n")
    vocab_size = len(BertTokenizer.from_pretrained(root / "bert")) + 2  # + BLIP's [DEC] and [ENC]
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }  # fmt: skip (the released file, shrunk)
    (root / "med_config.json").write_text(json.dumps(med))
    vision = BlipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, layer_norm_eps=1e-6)  # fmt: skip
    model = ImageRewardModel(vision, text_config_from_med(med, 128)).eval()
    _randomize(model, seed=4)
    official = mole_to_official(model.state_dict())
    official["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # old transformers saved it
    torch.save(official, root / "ImageReward.pt")
    config = {
        "checkpoint": root / "ImageReward.pt",
        "med_config": root / "med_config.json",
        "tokenizer": root / "bert",
    }
    return model, official, config


def _ref_imagereward(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward.score on the released names: BLIP vit.py, med.py's BertModel (multimodal), MLP, normalisation."""
    v = "blip.visual_encoder."
    conv = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, conv, sd[v + "patch_embed.proj.bias"], stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"]
    heads, width = 2, x.shape[-1]
    for i in range(2):
        p = f"{v}blocks.{i}."
        y = F.layer_norm(x, (width,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        b, n, c = y.shape
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads)
        q, k, vv = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        x = x + F.linear(
            (attn @ vv).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        y = F.layer_norm(x, (width,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])  # fmt: skip
        x = x + y
    image = F.layer_norm(x, (width,), sd[v + "norm.weight"], sd[v + "norm.bias"], 1e-6)

    t = "blip.text_encoder."

    def lin(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def ln(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-12)

    def attention(h: torch.Tensor, kv: torch.Tensor, p: str, additive: torch.Tensor | float) -> torch.Tensor:
        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(z.shape[0], z.shape[1], 2, -1).permute(0, 2, 1, 3)

        q, k, val = split(lin(h, p + "self.query")), split(lin(kv, p + "self.key")), split(lin(kv, p + "self.value"))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + additive
        ctx = (scores.softmax(-1) @ val).permute(0, 2, 1, 3).reshape(h.shape)
        return ln(lin(ctx, p + "output.dense") + h, p + "output.LayerNorm")

    h = (
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    h = ln(h, t + "embeddings.LayerNorm")
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's get_extended_attention_mask
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        h = attention(h, h, p + "attention.", extended)
        h = attention(h, image, p + "crossattention.", 0.0)  # image_atts are all ones
        ffn = lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense")
        h = ln(ffn + h, p + "output.LayerNorm")
    r = h[:, 0]
    for layer in (0, 2, 4, 6, 7):  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        r = lin(r, f"mlp.layers.{layer}")
    return (r.squeeze(-1) - REWARD_MEAN) / REWARD_STD


def test_imagereward_key_layout(imagereward_files) -> None:
    model, official, _ = imagereward_files
    for key in ("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.norm.weight",
                "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.1.attn.qkv.weight",
                "blip.visual_encoder.blocks.0.attn.proj.bias", "blip.visual_encoder.blocks.0.mlp.fc2.weight",
                "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
                "blip.text_encoder.embeddings.word_embeddings.weight", "blip.vision_proj.weight",
                "blip.text_proj.bias", "mlp.layers.0.weight", "mlp.layers.7.bias"):  # fmt: skip
        assert key in official, key
    assert official["blip.visual_encoder.cls_token"].shape == (1, 1, 128)
    assert official["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (64, 128)
    assert official["mlp.layers.0.weight"].shape == (1024, 64) and official["mlp.layers.7.weight"].shape == (1, 16)
    assert not any("token_type" in k or "pooler" in k for k in official)  # med.py has neither
    mapped = official_to_mole(official)
    assert mapped.keys() == {k for k in model.state_dict() if not k.endswith("position_ids")}
    with pytest.raises(ValueError, match=r"blip\.text_decoder"):
        official_to_mole({**official, "blip.text_decoder.cls.bias": torch.zeros(1)})


def test_imagereward_round_trip_and_reference(imagereward_files) -> None:
    model, official, config = imagereward_files
    scorer = build_scorer("imagereward", {**config, "batch_size": 2}, device="cpu")
    assert scorer.name == "imagereward"
    loaded = scorer.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k

    images = _images()
    scores = scorer.score(images, PROMPTS)
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (5, 35) and tokens["attention_mask"][0].sum() < 35  # padding is exercised
    with torch.no_grad():
        pixels = clip_preprocess(images, 32)
        same_model = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        reference = _ref_imagereward({k: v.float() for k, v in official.items()}, pixels, tokens["input_ids"],
                                     tokens["attention_mask"])  # fmt: skip
    np.testing.assert_allclose(scores, same_model.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, reference.numpy(), rtol=0, atol=1e-4)
    assert len(set(np.round(scores, 5))) == len(scores)

    # Batching and repetition change nothing.
    single = build_scorer("imagereward", {**config, "batch_size": 16}, device="cpu")
    np.testing.assert_allclose(single.score(images, PROMPTS), scores, rtol=0, atol=1e-5)
    assert scorer.score(images, PROMPTS) == scores


def test_imagereward_tokenizer_has_blip_tokens(imagereward_files) -> None:
    _, _, config = imagereward_files
    scorer = build_scorer("ir", config, device="cpu")
    ids = scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    assert ids == [len(scorer.tokenizer) - 2, len(scorer.tokenizer) - 1]
    assert len(scorer.tokenizer) == scorer.model.text_encoder.config.vocab_size


# ------------------------------------------------------------------------------------------------------------
# Errors, preprocessing
# ------------------------------------------------------------------------------------------------------------


def test_missing_files_name_the_path(tmp_path: Path, imagereward_files, hps_v1_files, clip_tokenizer_dir) -> None:
    _, _, ir_config = imagereward_files
    missing = tmp_path / "nowhere" / "ImageReward.pt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/ImageReward\.pt.*ImageReward\.pt"):
        build_scorer("imagereward", {**ir_config, "checkpoint": missing})
    with pytest.raises(FileNotFoundError, match="med_config"):
        build_scorer("imagereward", {**ir_config, "med_config": tmp_path / "med_config.json"})
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt"):
        build_scorer("imagereward", {**ir_config, "tokenizer": tmp_path})
    with pytest.raises(FileNotFoundError, match=r"hpc\.pt"):
        build_scorer("hps_v1", {"checkpoint": tmp_path / "hpc.pt", "tokenizer": clip_tokenizer_dir})
    _, _, hpc = hps_v1_files
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        build_scorer("hps_v1", {"checkpoint": hpc, "tokenizer": tmp_path})
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        build_scorer("clip", {"model": tmp_path})
    with pytest.raises(FileNotFoundError, match="HPS v2"):
        build_scorer("hps_v2", {"checkpoint": tmp_path / "HPS_v2.1_compressed.pt", "tokenizer": clip_tokenizer_dir})


def test_config_errors(hps_v1_files) -> None:
    _, _, hpc = hps_v1_files
    with pytest.raises(ValueError, match="'tokenizer'"):
        build_scorer("hps_v1", {"checkpoint": hpc})
    with pytest.raises(ValueError, match="'med_config'"):
        build_scorer("imagereward", {"checkpoint": hpc})
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("fid", {})
    assert set(SCORER_NAMES) == {"clip", "hps_v1", "hps_v2", "imagereward"}


def test_pickled_objects_need_opt_in(tmp_path: Path, hps_v1_files, clip_tokenizer_dir: Path) -> None:
    _, openai_sd, _ = hps_v1_files
    path = tmp_path / "hpc.pt"
    torch.save({"state_dict": openai_sd, "args": Path("/not/a/tensor")}, path)  # a pickled object, like argparse
    with pytest.raises(ValueError, match="trust_pickle"):
        build_scorer("hps_v1", {"checkpoint": path, "tokenizer": clip_tokenizer_dir})
    scorer = build_scorer("hps_v1", {"checkpoint": path, "tokenizer": clip_tokenizer_dir, "trust_pickle": True})
    assert len(scorer.score(_images(1), PROMPTS[:1])) == 1


def test_clip_preprocess_is_torchvision_resize_crop_normalize() -> None:
    rng = np.random.default_rng(0)
    # Shorter side already at the size: no resize, centre crop of the long side (torchvision rounds half to even).
    for height, top in ((300, 38), (225, 0), (227, 2)):
        pixels = rng.integers(0, 256, (height, 224, 3), dtype=np.uint8)
        out = clip_preprocess([Image.fromarray(pixels)], 224)
        crop = pixels[top : top + 224].astype(np.float32) / 255.0
        expected = (crop - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
        np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    # Otherwise the shorter side goes to the size with PIL bicubic, the longer side truncated: 30x20 -> 33x22.
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((33, 22), Image.Resampling.BICUBIC), np.float32)[:, 6:28] / 255.0
    expected = (resized - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    np.testing.assert_allclose(clip_preprocess([image], 22)[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    with pytest.raises(TypeError, match="PIL"):
        clip_preprocess([np.zeros((4, 4, 3))], 4)  # type: ignore[list-item]


@pytest.mark.gpu
def test_scorers_on_cuda_match_cpu(hps_v1_files, imagereward_files, clip_tokenizer_dir: Path) -> None:
    _, _, hpc = hps_v1_files
    _, _, ir_config = imagereward_files
    images = _images()
    for name, config in (("hps_v1", {"checkpoint": hpc, "tokenizer": clip_tokenizer_dir}), ("imagereward", ir_config)):
        cpu = build_scorer(name, config, device="cpu").score(images, PROMPTS)
        gpu = build_scorer(name, config, device="cuda")
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.score(images, PROMPTS), cpu, atol=1e-3)
        half = build_scorer(name, {**config, "dtype": "float16"}, device="cuda").score(images, PROMPTS)
        np.testing.assert_allclose(half, cpu, atol=0.5)
