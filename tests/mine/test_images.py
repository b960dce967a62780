"""Bootstrapping over a folder of images without objects: mining it (every detection a false
positive, paths recorded), training with its images and their mined boxes, the rounds' table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hardmine.config import config_from_dict
from hardmine.data import ImageFolder, NegativeImageMix, load_hard_negatives
from hardmine.data.background import write_background_images
from hardmine.engine.build import build_datasets, training_set
from hardmine.mine import fp_per_image_at_score, mine_folder
from hardmine.mine.falsepos import ImageDetections
from hardmine.models import build


@pytest.fixture(scope="module")
def background(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bg")
    write_background_images(folder / "set_a", 3, image_size=64)
    write_background_images(folder / "set_b", 2, seed=7, image_size=64)  # a subfolder too
    return folder


def _config(tmp_path: Path, **extra) -> dict:
    return {
        "model": {"name": "faster_rcnn_tiny"},
        "sampler": {"name": "random", "num": 64},
        "data": {"num_train": 4, "num_val": 3, "image_size": 64, "batch_size": 2},
        "train": {"epochs": 1, "warmup_steps": 1, "log_every": 1, "eval_every": 0},
        "device": "cpu",
        "output_dir": str(tmp_path / "run"),
        **extra,
    }


def test_every_detection_on_the_folder_is_mined_with_its_path(background) -> None:
    torch.manual_seed(0)
    detector = build("faster_rcnn_tiny", 4).eval()
    folder = ImageFolder(background, categories=["a", "b", "c"])
    assert folder.files[0] == "set_a/bg_00000.png" and len(folder) == 5
    hard, detections = mine_folder(detector, folder, device="cpu", top_k=3, source="untrained")
    assert sum(d.boxes.shape[0] for d in detections) > 0  # an untrained detector fires anywhere
    assert dict(hard.file_names) == {i: folder.path_of(i) for i in folder.ids}
    assert hard.folder == str(background.resolve())  # absolute: S15 D1
    for d in detections:
        mined = hard.images[d.image_id]
        # No objects: the top 3 detections of each image, whatever they overlap.
        top = torch.sort(d.scores, descending=True, stable=True).values[:3]
        assert torch.equal(mined.scores, top)


def test_a_mined_file_is_tied_to_its_folders_bytes_not_its_names(tmp_path) -> None:
    """S15 D1: a file mined on one folder trained silently on another folder with the same file
    names, and mine overwrote a file of one folder with another's boxes."""
    import shutil

    from hardmine.data import save_hard_negatives
    from hardmine.errors import DataError, RunError
    from hardmine.mine.detections import check_overwrite

    write_background_images(tmp_path / "a", 3, image_size=64)
    write_background_images(tmp_path / "b", 3, seed=7, image_size=64)  # same names, other pixels
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the same bytes elsewhere
    torch.manual_seed(0)
    detector = build("faster_rcnn_tiny", 4).eval()
    hard, _ = mine_folder(detector, ImageFolder(tmp_path / "a"), device="cpu", top_k=2)
    path = save_hard_negatives(hard, tmp_path / "hn.json")
    loaded = load_hard_negatives(path)
    assert loaded.digests == hard.digests and len(set(loaded.digests.values())) == 3
    assert loaded.folder == str((tmp_path / "a").resolve())
    scenes = ImageFolder(tmp_path / "copy", first_id=100)  # any dataset: ids apart
    NegativeImageMix(scenes, ImageFolder(tmp_path / "copy"), share=0.5, mined=loaded)
    with pytest.raises(DataError, match=r"b/bg_00000\.png: not the image mined as bg_00000\.png"):
        NegativeImageMix(scenes, ImageFolder(tmp_path / "b"), share=0.5, mined=loaded)
    settings = dict(hard.settings)
    with pytest.raises(RunError, match=r"mined on the folder .*a, which a run may have trained"):
        check_overwrite(path, settings, folder=str((tmp_path / "b").resolve()))
    check_overwrite(path, settings, folder=str((tmp_path / "a").resolve()))  # the same folder


def test_mine_accepts_its_folder_from_another_working_folder(tmp_path, monkeypatch) -> None:
    from hardmine.data import HardNegatives, MinedBoxes, save_hard_negatives
    from hardmine.mine.detections import check_overwrite

    (tmp_path / "bg").mkdir()
    hard = HardNegatives(
        images={1: MinedBoxes.empty()}, file_names={1: "x.png"}, folder=str(tmp_path / "bg")
    )
    path = save_hard_negatives(hard, tmp_path / "hn.json")
    monkeypatch.chdir(tmp_path / "bg")
    check_overwrite(path, {}, folder=".")  # the same folder reached as "."


def test_false_positives_per_image_at_a_score() -> None:
    def image(scores):
        n = len(scores)
        empty = torch.zeros(0, 4)
        boxes = torch.tensor([[0.0, 0, 5, 5]] * n).reshape(-1, 4)
        labels = torch.ones(n).long()
        return ImageDetections(0, boxes, torch.tensor(scores), labels, empty, labels[:0], empty)

    images = [image([0.9, 0.5, 0.49]), image([]), image([0.7])]
    assert fp_per_image_at_score(images, 0.5) == pytest.approx(3 / 3)
    assert fp_per_image_at_score(images, 0.8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no images"):
        fp_per_image_at_score([], 0.5)


def test_the_training_set_takes_the_folder_at_its_share(background, tmp_path) -> None:
    config = config_from_dict(
        _config(tmp_path, negative_images=str(background), negative_image_share=0.5)
    )
    train_set, _, _ = build_datasets(config)
    mixed = training_set(config, train_set)
    assert isinstance(mixed, NegativeImageMix)
    assert len(mixed) == 4 + 4  # half of each epoch from the folder
    ids = {mixed[i][1]["image_id"] for i in range(4, 8)}
    assert min(ids) == 5  # after the four training images' ids
    _, target = mixed[5]
    assert target["boxes"].shape == (0, 4) and "hard_negatives" not in target
    # The training loop tells the set its epoch before each epoch's loader copies it.
    from hardmine.engine.distributed import Process
    from hardmine.engine.train import epoch_loader

    loader = epoch_loader(mixed, config, Process(0, 1, torch.device("cpu")), epoch=3, skip=0)
    assert mixed.epoch == 3
    seen = {t["image_id"] for _, targets in loader for t in targets if t["image_id"] > 4}
    assert seen == {mixed[i][1]["image_id"] for i in range(4, 8)}


def test_mine_a_folder_and_train_with_it_from_the_command_line(background, tmp_path, capsys):
    from hardmine.cli import main

    run = tmp_path / "run"
    argv = ["train", "--device", "cpu", "--output_dir", str(run), "--negative-images"]
    tiny = ["--data.num_train", "4", "--data.num_val", "3", "--data.image_size", "64"]
    tiny += ["--train.epochs", "1", "--train.eval_every", "0", "--sampler.num", "64"]
    assert main([*argv, str(background), *tiny]) == 0
    assert "negative_images" in (run / "config.yaml").read_text()

    assert main(["mine", "--run", str(run), "--images", str(background), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "false positives kept on 5 images" in out and "per image score at least 0.5" in out
    path = run / "hard_negatives_images.json"
    hard = load_hard_negatives(path)
    assert json.loads(path.read_text())["version"] == 2
    assert sorted(hard.file_names.values()) == ImageFolder(background).files
    assert all(m.boxes.shape[0] <= 2 for m in hard.images.values())

    again = tmp_path / "again"
    argv = ["train", "--device", "cpu", "--output_dir", str(again), "--negative-images"]
    argv += [str(background), "--hard-negatives", str(path), "--negative-image-share", "0.5"]
    assert main([*argv, *tiny]) == 0
    assert (again / "results.json").exists()


def test_folder_mistakes_are_one_line(background, tmp_path, capsys) -> None:
    from hardmine.cli import main

    run = tmp_path / "run"
    argv = ["train", "--device", "cpu", "--output_dir", str(run)]
    argv += ["--data.num_train", "2", "--data.image_size", "64", "--train.epochs", "1"]
    for extra, message in (
        (["--negative-images", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: no such"),
        (["--negative-images", str(background), "--negative-image-share", "1"], "[0, 1)"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([*argv, *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_bootstrap_over_a_folder(background, tmp_path) -> None:
    from hardmine.mine.run import bootstrap, format_rounds

    config = config_from_dict(_config(tmp_path))
    out = tmp_path / "boot"
    kwargs = {"rounds": 2, "output_dir": out, "top_k": 3, "negative_images": background}
    results = bootstrap(config, **kwargs)
    first, second = results
    assert first.trained_with == 0 and second.mined is None
    consumed = load_hard_negatives(out / "round0" / "hard_negatives.json")
    assert consumed.file_names and second.trained_with == first.mined == consumed.num_boxes
    assert all(r.fp_per_background_image is not None for r in results)
    round1 = (out / "round1" / "config.yaml").read_text()
    assert "negative_images" in round1 and "round0/hard_negatives.json" in round1
    table = format_rounds(results, recall=0.5, fp_score=0.5)
    assert "FP / background image @ score 0.5" in table
    report = json.loads((out / "bootstrap.json").read_text())
    assert report["negative_images"] == str(background) and report["fp_score"] == 0.5
    assert "no objects" in (out / "bootstrap.md").read_text()
    # A rerun skips the finished rounds and reports the same numbers.
    assert bootstrap(config, **kwargs) == results
