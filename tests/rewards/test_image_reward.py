"""ImageReward on transformers' BLIP: checkpoint conversion, strict loading, and the reward's contract.

Everything runs on a tiny BLIP with ImageReward's structure (ViT with a final norm, BERT with
cross-attention in every layer, the 1024-128-64-16-1 MLP) and a checkpoint written here with the
ORIGINAL key names. The vision width (48) differs from the text width (32) so that a cross-attention
key/value mix-up shows as a shape error. The table of original names below is written by hand from
BLIP's VisionTransformer / med.py BertModel and ImageReward's MLP; it does not use the converter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from rlbooth.rewards import RewardError, build_reward
from rlbooth.rewards import image_reward as ir
from rlbooth.rewards.common import ScoreMLP
from tests.conftest import max_level_difference, pil_to_batch, real_photo_layouts

WORDS = ["a", "photo", "of", "cat", "dog", "sks", "on", "the", "beach", "red", "in", "snow", "##s", "with", "hat"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]", "[ENC]"]


@dataclass(frozen=True)
class Dims:
    vision: int = 48
    vision_mlp: int = 96
    vision_layers: int = 2
    patch: int = 8
    image: int = 32
    text: int = 32
    text_mlp: int = 64
    text_layers: int = 2
    vocab: int = len(VOCAB)
    positions: int = 40
    proj: int = 16


TINY_DIMS = Dims()
# ImageReward as released: BLIP ViT-L/16 at 224 px + BERT-base with cross-attention, MLP on 768.
FULL_DIMS = Dims(vision=1024, vision_mlp=4096, vision_layers=24, patch=16, image=224, text=768, text_mlp=3072,
                 text_layers=12, vocab=30524, positions=512, proj=256)
V, T, IMAGE, POS = TINY_DIMS.vision, TINY_DIMS.text, TINY_DIMS.image, TINY_DIMS.positions
TINY = {
    "vision_config": {"hidden_size": V, "intermediate_size": TINY_DIMS.vision_mlp,
                      "num_hidden_layers": TINY_DIMS.vision_layers, "num_attention_heads": 4, "image_size": IMAGE,
                      "patch_size": TINY_DIMS.patch},
    "text_config": {"vocab_size": len(VOCAB), "hidden_size": T, "intermediate_size": TINY_DIMS.text_mlp,
                    "num_hidden_layers": TINY_DIMS.text_layers, "num_attention_heads": 4,
                    "max_position_embeddings": POS,
                    "bos_token_id": VOCAB.index("[DEC]"), "sep_token_id": VOCAB.index("[SEP]"), "pad_token_id": 0},
    "image_text_hidden_size": TINY_DIMS.proj,
}
PROMPTS = ["a photo of a cat", "a sks dog on the beach", "a red cat in the snow", "a dog with a hat"]
HEAD = "mlp:"  # marks targets in the reward MLP rather than in BlipForImageTextRetrieval


def original_layout(d: Dims = TINY_DIMS) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """(key in ImageReward.pt, expected transformers key or None if dropped, shape)."""
    V, VI, P, T, TI = d.vision, d.vision_mlp, d.patch, d.text, d.text_mlp
    patches = (d.image // P) ** 2
    rows: list[tuple[str, str | None, tuple[int, ...]]] = [
        ("blip.visual_encoder.cls_token", "vision_model.embeddings.class_embedding", (1, 1, V)),
        ("blip.visual_encoder.pos_embed", "vision_model.embeddings.position_embedding", (1, patches + 1, V)),
        ("blip.visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight", (V, 3, P, P)),
        ("blip.visual_encoder.patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias", (V,)),
        ("blip.visual_encoder.norm.weight", "vision_model.post_layernorm.weight", (V,)),
        ("blip.visual_encoder.norm.bias", "vision_model.post_layernorm.bias", (V,)),
    ]
    for i in range(d.vision_layers):
        src, dst = f"blip.visual_encoder.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        rows += [
            (src + "norm1.weight", dst + "layer_norm1.weight", (V,)),
            (src + "norm1.bias", dst + "layer_norm1.bias", (V,)),
            (src + "attn.qkv.weight", dst + "self_attn.qkv.weight", (3 * V, V)),
            (src + "attn.qkv.bias", dst + "self_attn.qkv.bias", (3 * V,)),
            (src + "attn.proj.weight", dst + "self_attn.projection.weight", (V, V)),
            (src + "attn.proj.bias", dst + "self_attn.projection.bias", (V,)),
            (src + "norm2.weight", dst + "layer_norm2.weight", (V,)),
            (src + "norm2.bias", dst + "layer_norm2.bias", (V,)),
            (src + "mlp.fc1.weight", dst + "mlp.fc1.weight", (VI, V)),
            (src + "mlp.fc1.bias", dst + "mlp.fc1.bias", (VI,)),
            (src + "mlp.fc2.weight", dst + "mlp.fc2.weight", (V, VI)),
            (src + "mlp.fc2.bias", dst + "mlp.fc2.bias", (V,)),
        ]
    text = [
        ("embeddings.word_embeddings.weight", (d.vocab, T)),
        ("embeddings.position_embeddings.weight", (d.positions, T)),
        ("embeddings.LayerNorm.weight", (T,)),
        ("embeddings.LayerNorm.bias", (T,)),
    ]
    for i in range(d.text_layers):
        layer = f"encoder.layer.{i}."
        for block, kv_width in (("attention", T), ("crossattention", V)):
            text += [
                (f"{layer}{block}.self.query.weight", (T, T)), (f"{layer}{block}.self.query.bias", (T,)),
                (f"{layer}{block}.self.key.weight", (T, kv_width)), (f"{layer}{block}.self.key.bias", (T,)),
                (f"{layer}{block}.self.value.weight", (T, kv_width)), (f"{layer}{block}.self.value.bias", (T,)),
                (f"{layer}{block}.output.dense.weight", (T, T)), (f"{layer}{block}.output.dense.bias", (T,)),
                (f"{layer}{block}.output.LayerNorm.weight", (T,)), (f"{layer}{block}.output.LayerNorm.bias", (T,)),
            ]
        text += [
            (f"{layer}intermediate.dense.weight", (TI, T)), (f"{layer}intermediate.dense.bias", (TI,)),
            (f"{layer}output.dense.weight", (T, TI)), (f"{layer}output.dense.bias", (T,)),
            (f"{layer}output.LayerNorm.weight", (T,)), (f"{layer}output.LayerNorm.bias", (T,)),
        ]
    rows += [(f"blip.text_encoder.{name}", f"text_encoder.{name}", shape) for name, shape in text]
    rows += [
        ("blip.text_encoder.embeddings.position_ids", None, (1, d.positions)),  # persistent buffer in BLIP's med.py
        ("blip.vision_proj.weight", "vision_proj.weight", (d.proj, V)),
        ("blip.vision_proj.bias", "vision_proj.bias", (d.proj,)),
        ("blip.text_proj.weight", "text_proj.weight", (d.proj, T)),
        ("blip.text_proj.bias", "text_proj.bias", (d.proj,)),
    ]
    widths = [T, 1024, 128, 64, 16, 1]
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), itertools.pairwise(widths)):
        rows += [(f"mlp.layers.{index}.weight", f"{HEAD}layers.{index}.weight", (fan_out, fan_in)),
                 (f"mlp.layers.{index}.bias", f"{HEAD}layers.{index}.bias", (fan_out,))]
    return rows


def original_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, _, shape in original_layout():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.2 * torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("image-reward")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.save(original_state_dict(), root / "ImageReward.pt")
    return {"checkpoint": str(root / "ImageReward.pt"), "tokenizer": str(root / "tokenizer"), "root": str(root)}


def load(files: dict[str, str], state: dict[str, torch.Tensor] | None = None, **options) -> ir.ImageRewardScorer:
    checkpoint = files["checkpoint"]
    if state is not None:
        checkpoint = f"{files['root']}/variant.pt"
        torch.save(state, checkpoint)
    options = {"checkpoint": checkpoint, "tokenizer": files["tokenizer"], "config": TINY} | options
    return build_reward("image_reward", **options)


@pytest.fixture(scope="module")
def scorer(files: dict[str, str]) -> ir.ImageRewardScorer:
    return load(files)


def images(batch: int, seed: int = 0, size: tuple[int, int] = (IMAGE, IMAGE)) -> torch.Tensor:
    """Random 8-bit images as floats: the reward scores an image's 8-bit copy, so these are scored as given."""
    levels = torch.randint(0, 256, (batch, 3, *size), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 255


def score(scorer: ir.ImageRewardScorer, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return scorer(pixels, prompts, [{}] * len(prompts))


# ---------------------------------------------------------------- conversion and loading


def test_checkpoint_loads_every_weight_where_it_belongs(scorer: ir.ImageRewardScorer):
    assert scorer.ignored_missing_keys == ["itm_head.bias", "itm_head.weight"]
    original = original_state_dict()
    blip, head = scorer.model.state_dict(), scorer.head.state_dict()
    for key, target, _ in original_layout():
        if target is None:
            continue
        loaded = head[target.removeprefix(HEAD)] if target.startswith(HEAD) else blip[target]
        assert torch.equal(loaded, original[key]), f"{key} -> {target}"
    ids = scorer.model.text_encoder.embeddings.position_ids
    assert torch.equal(ids, torch.arange(POS).unsqueeze(0))
    assert not scorer.model.itm_head.weight.any()  # unused head: zeros, not uninitialized memory


def test_converter_renames_exactly_the_table():
    blip, head = ir.convert_image_reward_state_dict(original_state_dict())
    rows = original_layout()
    assert set(blip) == {t for _, t, _ in rows if t is not None and not t.startswith(HEAD)}
    assert set(head) == {t.removeprefix(HEAD) for _, t, _ in rows if t is not None and t.startswith(HEAD)}


def test_default_config_fits_the_released_checkpoint_layout():
    """ImageReward's real shapes (ViT-L/16 + BERT-base, 24 and 12 layers), checked on the meta device."""
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, _, shape in original_layout(FULL_DIMS)}
        blip, head = ir.convert_image_reward_state_dict(state)
        config = ir.blip_config()
        from transformers import BlipForImageTextRetrieval

        model = BlipForImageTextRetrieval(config)
        mlp = ScoreMLP(config.text_config.hidden_size)
    assert ir._check_keys("BLIP model", "meta", model.state_dict(), blip, ir.UNUSED_PREFIXES) == [
        "itm_head.bias", "itm_head.weight"]
    assert ir._check_keys("reward MLP", "meta", mlp.state_dict(), head) == []
    assert config.vision_config.layer_norm_eps == 1e-6 and config.text_config.encoder_hidden_size == 1024
    assert config.vision_config.num_attention_heads == 16 and config.text_config.num_attention_heads == 12


@pytest.mark.parametrize("dropped", range(len(ir.RENAME_RULES)), ids=lambda i: ir.RENAME_RULES[i][0].replace("\\", ""))
def test_every_rename_rule_is_needed(files, monkeypatch: pytest.MonkeyPatch, dropped: int):
    monkeypatch.setattr(ir, "RENAME_RULES", ir.RENAME_RULES[:dropped] + ir.RENAME_RULES[dropped + 1:])
    with pytest.raises(RewardError, match="does not load into ImageReward"):
        load(files)


def test_unexpected_and_missing_keys_are_named(files):
    state = original_state_dict()
    state["blip.visual_encoder.head.weight"] = torch.zeros(3, V)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    with pytest.raises(RewardError) as err:
        load(files, state)
    assert "unexpected keys [blip.visual_encoder.head.weight]" in str(err.value)
    assert "missing keys [text_encoder.encoder.layer.1.crossattention.self.key.weight]" in str(err.value)


def test_missing_mlp_layer_fails(files):
    state = original_state_dict()
    del state["mlp.layers.7.bias"]
    with pytest.raises(RewardError, match=r"reward MLP: missing keys \[layers.7.bias\]"):
        load(files, state)


def test_config_that_does_not_fit_the_checkpoint_fails(files):
    config = {**TINY, "text_config": {**TINY["text_config"], "intermediate_size": 2 * TINY_DIMS.text_mlp}}
    with pytest.raises(RewardError, match="shape mismatches"):
        load(files, config=config)


def test_missing_files_and_bad_options_are_user_errors(files, tmp_path):
    with pytest.raises(RewardError, match="no such file"):
        load(files, checkpoint=str(tmp_path / "nothing.pt"))
    with pytest.raises(RewardError, match="holds no ImageReward.pt"):
        load(files, checkpoint=str(tmp_path))
    with pytest.raises(RewardError, match=r"align\.reward_options\.image_reward\.checkpoint"):
        load(files, checkpoint="nobody/no-such-image-reward")  # HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(RewardError, match="dtype"):
        load(files, dtype="float8")
    with pytest.raises(RewardError, match="batch_size"):
        load(files, batch_size=0)
    with pytest.raises(RewardError, match="not a valid BlipConfig"):
        load(files, config={"vision_config": {"hidden_size": "wide"}})
    short = tmp_path / "short-vocab"
    short.mkdir()
    (short / "vocab.txt").write_text("\n".join(VOCAB[:-3]) + "\n")
    with pytest.raises(RewardError, match="tokens with"):
        load(files, tokenizer=str(short))


def test_checkpoint_folder_is_accepted(files):
    assert load(files, checkpoint=files["root"]).ignored_missing_keys == ["itm_head.bias", "itm_head.weight"]


# ---------------------------------------------------------------- the reward


def test_output_contract(scorer: ir.ImageRewardScorer):
    pixels = images(4).requires_grad_(True)
    out = score(scorer, pixels, PROMPTS)
    assert out.shape == (4,) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad and torch.isfinite(out).all()
    assert torch.equal(out, score(scorer, pixels, PROMPTS))  # deterministic: dropout is off
    assert not scorer.model.training and not scorer.head.training
    assert score(scorer, torch.zeros(0, 3, IMAGE, IMAGE), []).shape == (0,)
    with pytest.raises(RewardError, match=r"\[0, 1\]"):
        score(scorer, pixels * 2 - 1, PROMPTS)


def test_batching_does_not_change_scores(files, scorer: ir.ImageRewardScorer):
    pixels = images(4, seed=1)
    together = score(scorer, pixels, PROMPTS)
    alone = torch.cat([score(scorer, pixels[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # float32 noise of batched matmuls
    chunked = load(files, batch_size=3)
    torch.testing.assert_close(score(chunked, pixels, PROMPTS), together, atol=1e-5, rtol=1e-5)


def test_image_and_prompt_both_matter(scorer: ir.ImageRewardScorer):
    pixels = images(2, seed=2)
    same_prompt = score(scorer, pixels, [PROMPTS[0]] * 2)
    assert (same_prompt[0] - same_prompt[1]).abs() > 1e-4
    same_image = score(scorer, pixels[:1].expand(2, -1, -1, -1), PROMPTS[:2])
    assert (same_image[0] - same_image[1]).abs() > 1e-4


def test_score_is_the_normalized_mlp_output_computed_by_hand(scorer: ir.ImageRewardScorer):
    pixels = images(2, seed=3)
    prompts = PROMPTS[1:3]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        vision = scorer.model.vision_model(pixel_values=(pixels - mean) / std).last_hidden_state
        tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert (tokens["input_ids"][:, 0] == VOCAB.index("[CLS]")).all()  # as ImageReward feeds it: no [ENC] swap
        text = scorer.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                         encoder_hidden_states=vision,
                                         encoder_attention_mask=torch.ones(vision.shape[:2], dtype=torch.long))
        raw = scorer.head(text.last_hidden_state[:, 0]).squeeze(-1)
    expected = (raw - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(scorer.raw(pixels, prompts), raw, atol=1e-6, rtol=0)
    torch.testing.assert_close(score(scorer, pixels, prompts), expected, atol=1e-6, rtol=0)
    assert (expected - raw).abs().min() > 1e-3  # the constants really move the score


def test_prompts_are_padded_and_truncated_to_35_tokens(scorer: ir.ImageRewardScorer):
    tokens = scorer.tokenize(["a cat", " ".join(["dog"] * 60)])
    assert tokens["input_ids"].shape == (2, 35)
    assert tokens["attention_mask"][0].sum() == 4 and tokens["attention_mask"][1].sum() == 35
    assert tokens["input_ids"][1, -1] == VOCAB.index("[SEP]")


def original_preprocess(img: Image.Image, size: int = 224) -> torch.Tensor:
    """ImageReward's Resize(size, BICUBIC) / CenterCrop(size) / ToTensor / Normalize, written out with PIL and numpy."""
    short, long = sorted(img.size)
    scaled = (size, int(size * long / short))  # torchvision: the shorter side to `size`, the longer truncated
    width, height = scaled if img.width <= img.height else scaled[::-1]
    resized = img.resize((width, height), Image.Resampling.BICUBIC)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    normalized = (pixels - np.array(ir.CLIP_MEAN, np.float32)) / np.array(ir.CLIP_STD, np.float32)
    return torch.from_numpy(normalized).permute(2, 0, 1).unsqueeze(0)


@pytest.mark.parametrize("layout", ["photo", "mosaic", "wide"])
def test_preprocessing_matches_the_original_pil_pipeline_on_a_real_photo(layout: str):
    """Within one 8-bit level of the original's torchvision-on-PIL transforms at 224 px (torch's float bicubic
    was several levels off)."""
    img = real_photo_layouts()[layout]
    ours = ir.preprocess(pil_to_batch(img), 224)
    assert ours.shape == (1, 3, 224, 224)
    assert max_level_difference(ours, original_preprocess(img), ir.CLIP_STD) < 1.0
    tall = img.transpose(Image.Transpose.ROTATE_90)
    assert max_level_difference(ir.preprocess(pil_to_batch(tall), 224), original_preprocess(tall), ir.CLIP_STD) < 1.0


def test_scorer_preprocesses_at_its_model_resolution(scorer: ir.ImageRewardScorer):
    pixels = images(2, seed=4, size=(40, 52))
    assert torch.equal(scorer.preprocess(pixels), ir.preprocess(pixels, IMAGE))
    assert scorer.preprocess(pixels[..., :40, :20]).shape == (2, 3, IMAGE, IMAGE)


def test_reduced_precision_returns_float32(files, scorer: ir.ImageRewardScorer):
    half = load(files, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16 and half.head.layers[0].weight.dtype == torch.float32
    pixels = images(2, seed=5)
    out = score(half, pixels, PROMPTS[:2])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, score(scorer, pixels, PROMPTS[:2]), atol=0.1, rtol=0.05)
