"""CLIP-based rewards on a tiny random CLIP saved to disk and loaded through the real factories (no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rlbooth.rewards import (
    RewardError,
    build_reward,
    clip_models,  # noqa: F401  (registers aesthetic, clip_t, pickscore)
)
from rlbooth.rewards.clip_models import CLIP_MEAN, CLIP_STD, ClipPreprocess
from rlbooth.rewards.common import ScoreMLP
from tests.conftest import max_level_difference, pil_to_batch, real_photo_layouts

PROJECTION = 16
SIZE = 32
PROMPTS = ["a photo of a dog", "a red cube", "a photo of a dog", "a cat on a skateboard"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer CLIP (image 32 px, patch 8, projection 16) with its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rlbooth.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": SIZE, "patch_size": 8},
        projection_dim=PROJECTION,
    )
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE).save_pretrained(folder)
    return folder


def random_head(width: int = PROJECTION) -> dict[str, torch.Tensor]:
    """Original key names (layers.0/2/4/6/7 of sac+logos+ava1-l14-linearMSE.pth), input width of the tiny CLIP."""
    torch.manual_seed(1)
    return {key: value.clone() for key, value in ScoreMLP(width).state_dict().items()}


@pytest.fixture(scope="module")
def head_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("head") / "head.pth"
    torch.save(random_head(), path)
    return path


@pytest.fixture(scope="module")
def rewards(tiny_clip: Path, head_file: Path) -> dict:
    return {
        "aesthetic": build_reward("aesthetic", clip_model=str(tiny_clip), head=str(head_file)),
        "clip_t": build_reward("clip_t", clip_model=str(tiny_clip), batch_size=3),
        "pickscore": build_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip)),
    }


def images(batch: int = 4, height: int = 40, width: int = 48, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images as floats: the rewards score an image's 8-bit copy, so these are scored as given."""
    levels = torch.randint(0, 256, (batch, 3, height, width), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 255


def meta(batch: int) -> list[dict]:
    return [{} for _ in range(batch)]


@pytest.mark.parametrize("name", ["aesthetic", "clip_t", "pickscore"])
def test_contract_determinism_and_batching(rewards: dict, name: str):
    reward = rewards[name]
    x = images().requires_grad_(True)
    scores = reward(x, PROMPTS, meta(4))
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert not scores.requires_grad and torch.isfinite(scores).all()
    assert torch.equal(scores, reward(x, PROMPTS, meta(4)))
    one_by_one = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1], meta(1)) for i in range(4)])
    torch.testing.assert_close(one_by_one, scores, atol=1e-5, rtol=0)
    assert reward(x[:0], [], []).shape == (0,)
    with pytest.raises(RewardError, match=r"\[0, 1\]"):
        reward(x * 2 - 1, PROMPTS, meta(4))


def test_clip_t_is_a_cosine(rewards: dict):
    x = images(2)
    matching = rewards["clip_t"](x, ["a red triangle", "a red triangle"], meta(2))
    other = rewards["clip_t"](x, ["a bowl of soup", "a bowl of soup"], meta(2))
    for scores in (matching, other):
        assert ((scores >= -1) & (scores <= 1)).all()
    assert not torch.equal(matching, other)  # the prompt matters (no semantics with random weights)


def test_pickscore_is_scaled_cosine_by_hand(rewards: dict, tiny_clip: Path):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    x = images(height=SIZE, width=SIZE)  # already at the model's size: preprocessing is normalization only
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tokens = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(pixel_values=(x - mean) / std).pooler_output
        text_embs = model.get_text_features(**tokens).pooler_output
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    expected = model.logit_scale.exp().detach() * (image_embs * text_embs).sum(-1)
    torch.testing.assert_close(rewards["pickscore"](x, PROMPTS, meta(4)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards["clip_t"](x, PROMPTS, meta(4)), expected / model.logit_scale.exp().detach(),
                               atol=1e-5, rtol=1e-5)


def test_aesthetic_is_the_head_on_the_normalized_embedding(rewards: dict, tiny_clip: Path):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    head = ScoreMLP(PROJECTION)
    head.load_state_dict(random_head())
    x = images(height=SIZE, width=SIZE)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=(x - mean) / std).pooler_output
        expected = head.eval()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(rewards["aesthetic"](x, PROMPTS, meta(4)), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_head_keys_match_the_original_checkpoint():
    keys = list(ScoreMLP().state_dict())
    assert keys == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert ScoreMLP().state_dict()["layers.0.weight"].shape == (1024, 768)


def test_aesthetic_head_from_safetensors(tiny_clip: Path, head_file: Path, tmp_path: Path, rewards: dict):
    from safetensors.torch import save_file

    path = tmp_path / "head.safetensors"
    save_file(random_head(), str(path))
    reward = build_reward("aesthetic", clip_model=str(tiny_clip), head=str(path))
    x = images(2)
    assert torch.equal(reward(x, PROMPTS[:2], meta(2)), rewards["aesthetic"](x, PROMPTS[:2], meta(2)))


def test_bad_aesthetic_heads_fail_with_the_field(tiny_clip: Path, tmp_path: Path):
    renamed = random_head()
    renamed["layers.8.weight"] = renamed.pop("layers.7.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(RewardError, match=r"aesthetic\.head.*missing keys \['layers\.7\.weight'\].*"
                                          r"unexpected keys \['layers\.8\.weight'\]"):
        build_reward("aesthetic", clip_model=str(tiny_clip), head=str(tmp_path / "renamed.pth"))
    torch.save(random_head(width=768), tmp_path / "wide.pth")
    with pytest.raises(RewardError, match="16-d image embeddings"):
        build_reward("aesthetic", clip_model=str(tiny_clip), head=str(tmp_path / "wide.pth"))
    with pytest.raises(RewardError, match="no such file"):
        build_reward("aesthetic", clip_model=str(tiny_clip), head=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("layout", ["photo", "mosaic", "wide"])
def test_preprocess_matches_clip_image_processor_on_a_real_photo(layout: str):
    """Within one 8-bit level of CLIPImageProcessor (the CLIP, PickScore and aesthetic reference) on real photos.

    Torch's antialiased bicubic on floats was 4.6 levels off on the 256 px photo and 5.7 on the mosaic.
    """
    # The PIL backend, as CLIP's and PickScore's own code ran it (with torchvision installed, transformers 5's
    # CLIPImageProcessor resizes uint8 tensors with torchvision instead, 1-2 levels off PIL).
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()  # openai/clip-vit-* and laion/CLIP-ViT-H-14: shortest edge 224, crop 224
    preprocess = ClipPreprocess.from_config(processor.to_dict(), image_size=224)
    assert preprocess == ClipPreprocess(224, (224, 224))
    img = real_photo_layouts()[layout]
    reference = torch.as_tensor(processor(images=img, return_tensors="pt")["pixel_values"])
    ours = preprocess(pil_to_batch(img))
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    assert max_level_difference(ours, reference, CLIP_STD) < 1.0
    # in a batch, each image is preprocessed as alone
    batch = preprocess(torch.cat([pil_to_batch(img), pil_to_batch(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]))
    torch.testing.assert_close(batch[:1], ours, atol=0, rtol=0)


def test_preprocess_sizes_from_old_and_new_configs():
    old = ClipPreprocess.from_config({"size": 224, "crop_size": 224}, image_size=224)  # openai/clip-vit-*
    new = ClipPreprocess.from_config({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
                                     image_size=224)
    assert old == new == ClipPreprocess(224, (224, 224))
    assert old.output_size(512, 768) == (224, 336)
    assert old.output_size(300, 200) == (336, 224)
    assert old(torch.rand(1, 3, 100, 150)).shape == (1, 3, 224, 224)


def test_bare_model_folder_uses_clip_defaults(tiny_clip: Path, tmp_path: Path, rewards: dict):
    """A folder without preprocessor_config.json falls back to CLIP's mean/std at the model's image size."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_clip, bare)
    (bare / "preprocessor_config.json").unlink()
    x = images(2)
    reward = build_reward("clip_t", clip_model=str(bare))
    assert torch.equal(reward(x, PROMPTS[:2], meta(2)), rewards["clip_t"](x, PROMPTS[:2], meta(2)))


def test_bad_options_are_reported(tiny_clip: Path):
    with pytest.raises(RewardError, match=r"clip_t\.dtype='float8'"):
        build_reward("clip_t", clip_model=str(tiny_clip), dtype="float8")
    with pytest.raises(RewardError, match="batch_size"):
        build_reward("clip_t", clip_model=str(tiny_clip), batch_size=0)
    with pytest.raises(RewardError, match="bad options"):
        build_reward("pickscore", clip_model=str(tiny_clip))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(("name", "options", "field"), [
    ("aesthetic", {"clip_model": "no-such-org/no-such-clip"}, "align.reward_options.aesthetic.clip_model"),
    ("clip_t", {"clip_model": "no-such-org/no-such-clip"}, "align.reward_options.clip_t.clip_model"),
    ("pickscore", {"model": "no-such-org/no-such-clip"}, "align.reward_options.pickscore.model"),
])
def test_missing_hub_model_explains_the_fix(offline: None, name: str, options: dict, field: str):
    with pytest.raises(RewardError) as err:
        build_reward(name, **options)
    message = str(err.value)
    assert "no-such-org/no-such-clip" in message and field in message and "--set" in message


def test_missing_hub_processor_and_head_explain_the_fix(offline: None, tiny_clip: Path):
    with pytest.raises(RewardError) as err:
        build_reward("pickscore", model=str(tiny_clip), processor="no-such-org/no-such-processor")
    message = str(err.value)
    assert "no-such-org/no-such-processor" in message and "pickscore.processor" in message and "--set" in message
    with pytest.raises(RewardError) as err:
        build_reward("aesthetic", clip_model=str(tiny_clip), head="no-such-org/no-such-repo/head.pth")
    message = str(err.value)
    assert "no-such-org/no-such-repo" in message and "align.reward_options.aesthetic.head" in message
    assert "--set align.reward_options.aesthetic.head=" in message and "hf download" in message


def test_import_is_cheap():
    code = "import sys, rlbooth.rewards.clip_models; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
