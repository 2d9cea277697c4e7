import copy

import pytest
import torch
from torch import nn
from transformers import ViTModel

import conftest
from hf_dino.evaluation import RawPixels
from hf_dino.evaluation.features import backbone_cls_features, knn_feature_fn


def tiny_vit(layers=3):
    return conftest.tiny_vit(num_hidden_layers=layers, layer_norm_eps=1e-6)


def truncated(vit: ViTModel, drop_last: int) -> ViTModel:
    """The same ViT without its last `drop_last` blocks: its output is block L - drop_last's tokens
    after the final norm, computed without `output_hidden_states`."""
    shorter = copy.deepcopy(vit)
    shorter.layers = nn.ModuleList(list(shorter.layers)[:len(shorter.layers) - drop_last])
    return shorter


@torch.no_grad()
def test_knn_readouts_against_the_vit_computed_directly():
    vit, pixels = tiny_vit(), torch.randn(2, 3, 24, 24)  # 6 x 6 patches: interpolated position grid
    tokens = vit(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state  # (2, 37, 32), normed
    torch.testing.assert_close(knn_feature_fn("cls")(vit, pixels), tokens[:, 0])
    torch.testing.assert_close(knn_feature_fn("cls_mean_patch")(vit, pixels),
                               torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))
    cls_of = [truncated(vit, drop)(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0]
              for drop in (1, 0)]
    torch.testing.assert_close(knn_feature_fn("last_blocks", 2)(vit, pixels), torch.cat(cls_of, dim=-1))
    # unset: min(4, depth) = all 3 blocks
    assert knn_feature_fn("last_blocks")(vit, pixels).shape == (2, 3 * 32)


def test_a_model_without_blocks_keeps_its_one_feature():
    pixels = torch.randn(2, 3, 8, 8)
    for feature in ("cls", "cls_mean_patch", "last_blocks"):
        assert torch.equal(knn_feature_fn(feature)(RawPixels(), pixels), pixels.flatten(1))
    assert knn_feature_fn("cls") is backbone_cls_features


def test_impossible_readouts_are_clear_errors():
    with pytest.raises(ValueError, match="feature 'mean' is unknown; use one of cls, cls_mean_patch, last_blocks"):
        knn_feature_fn("mean")
    with pytest.raises(ValueError, match="--n_last_blocks 5: the backbone has 3 blocks; give 1 to 3"):
        knn_feature_fn("last_blocks", 5, tiny_vit())


def test_eval_knn_feature_flag(tmp_path, capsys):
    """--feature cls_mean_patch doubles the feature and is recorded; an impossible --n_last_blocks is
    one usage line (exit 2) before any feature is extracted."""
    import json

    from hf_dino.commands.eval_knn import main

    tiny_vit(layers=2).save_pretrained(tmp_path / "vit")
    common = ["--model", str(tmp_path / "vit"), "--max_train_samples", "64", "--max_val_samples", "16",
              "--num_workers", "0", "--image_size", "16"]
    main([*common, "--feature", "cls_mean_patch", "--output_json", str(tmp_path / "knn.json")])
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["feature"] == "cls_mean_patch" and (result["num_train"], result["num_val"]) == (64, 16)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--feature", "last_blocks", "--n_last_blocks", "3", "--output_json", str(tmp_path / "no.json")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err  # after transformers' weight-loading progress bar
    assert error.endswith("\nerror: --n_last_blocks 3: the backbone has 2 blocks; give 1 to 2\n")
    assert not (tmp_path / "no.json").exists()
