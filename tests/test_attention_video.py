"""Attention videos: frame rate and frame count of the MP4, PNGs per frame, thresholded masks on a
hand-made attention map, bad input."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from hf_dino.visualization.attention_video import (VideoInputError, colorize, generate_attention_video, open_video, prepare_frame,
                                     render_frame)


def tiny_vit(patch_size=8):
    return conftest.tiny_vit(image_size=4 * patch_size, patch_size=patch_size)


def synthetic_frames(count=9, height=48, width=70):
    """A red disk moving right over a blue gradient."""
    frames = []
    rows, columns = np.ogrid[:height, :width]
    for t in range(count):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        frame[..., 2] = np.linspace(0, 200, width).astype(np.uint8)[None, :]
        frame[(rows - height // 2) ** 2 + (columns - 8 - 5 * t) ** 2 <= 64] = (230, 30, 30)
        frames.append(frame)
    return frames


def write_video(path, frames, fps):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_rate_and_frames(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.average_rate), sum(1 for _ in container.decode(stream)), (stream.height, stream.width)


def test_video_file_gives_pngs_and_mp4_at_its_frame_rate(tmp_path):
    write_video(tmp_path / "clip.mp4", synthetic_frames(), fps=12)
    summary = generate_attention_video(tiny_vit(), tmp_path / "clip.mp4", tmp_path / "out", threshold=0.6,
                                       progress=False)
    assert summary["frames"] == 9 and summary["fps"] == 12 and summary["heads"] == 2
    assert summary["size"] == [48, 64]  # 70 cropped to a multiple of the patch size 8
    rate, frames, size = video_rate_and_frames(tmp_path / "out" / "attention.mp4")
    assert (rate, frames, size) == (12, 9, (48, 64))
    assert len(list((tmp_path / "out" / "attention").glob("*.png"))) == 9
    assert len(list((tmp_path / "out" / "heads").glob("*-head[01].png"))) == 18
    assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 9
    assert Image.open(tmp_path / "out" / "attention" / "00000.png").size == (64, 48)
    assert not (tmp_path / "out" / "attention.mp4.partial").exists()


def test_frame_folder_uses_the_fps_flag(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(synthetic_frames(count=4)):
        Image.fromarray(frame).save(folder / f"frame{index:03d}.png")
    summary = generate_attention_video(tiny_vit(), folder, tmp_path / "out", fps=5, progress=False)
    assert summary["frames"] == 4 and "masks" not in summary["pngs"]
    rate, frames, _ = video_rate_and_frames(tmp_path / "out" / "attention.mp4")
    assert (rate, frames) == (5, 4)
    assert open_video(folder).fps == 30.0  # a folder's default frame rate


def test_threshold_mask_keeps_the_patches_holding_that_share_of_the_mass():
    # one head, 2 x 2 patches of 2 pixels: mass 0.5, 0.3, 0.1, 0.1 -> the top two hold 0.8 >= 0.6,
    # the top one alone 0.5 < 0.6
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    attention = torch.tensor([[[0.5, 0.3], [0.1, 0.1]]])
    pictures = render_frame(image, attention, patch_size=2, threshold=0.6)
    kept = pictures["mask"][..., 0] == 200
    np.testing.assert_array_equal(kept, [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert pictures["mask"][3, 3, 0] == 50
    assert set(pictures) == {"mean", "head0", "mask"}


def test_mean_map_is_the_average_of_the_heads():
    image = np.zeros((2, 4, 3), dtype=np.uint8)
    attention = torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]]])  # mean: 0.5, 0.25 -> colour map ends 1 and 0
    pictures = render_frame(image, attention, patch_size=2)
    expected = (0.6 * colorize(np.array([[1.0, 1.0, 0.0, 0.0]]))).round().astype(np.uint8)
    np.testing.assert_array_equal(pictures["mean"][0], expected[0])


def test_prepare_frame_resizes_then_crops_to_the_patch_grid():
    image = np.zeros((100, 150, 3), dtype=np.uint8)
    cropped, pixels = prepare_frame(image, patch_size=16, resize=50)  # 50 x 75 -> 48 x 64
    assert cropped.shape == (48, 64, 3) and pixels.shape == (3, 48, 64)
    torch.testing.assert_close(pixels[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(VideoInputError, match="missing.mp4: no such video file"):
        open_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoInputError, match="empty: no frame"):
        open_video(tmp_path / "empty")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoInputError, match="notes.mp4: not a readable video"):
        open_video(tmp_path / "notes.mp4")

    folder = tmp_path / "frames"
    folder.mkdir()
    frames = synthetic_frames(count=3)
    Image.fromarray(frames[0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"garbage")
    with pytest.raises(VideoInputError, match=r"b\.png: unreadable frame"):
        generate_attention_video(tiny_vit(), folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "attention.mp4").exists()
    assert not (tmp_path / "out" / "attention.mp4.partial").exists()
    Image.fromarray(frames[1][:, :30]).save(folder / "b.png")
    with pytest.raises(VideoInputError, match="all frames must have one size"):
        generate_attention_video(tiny_vit(), folder, tmp_path / "out", progress=False)


def test_command_line(tmp_path, capsys):
    from hf_dino.commands.video_generation import main

    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), "--input", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "nothing: no such video file or frame folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    write_video(tmp_path / "clip.mp4", synthetic_frames(count=3), fps=10)
    main(["--model", str(model_dir), "--input", str(tmp_path / "clip.mp4"), "--output_dir", str(tmp_path / "out"),
          "--threshold", "0.6", "--output_json", str(tmp_path / "summary.json")])
    assert (tmp_path / "out" / "attention.mp4").is_file() and (tmp_path / "summary.json").is_file()
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--input", str(tmp_path / "clip.mp4"), "--output_dir", str(tmp_path / "o"),
              "--threshold", "1.5"])
    assert "--threshold 1.5" in capsys.readouterr().err
