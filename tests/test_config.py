"""Config: presets load, every bad value is refused before work with a message that names it."""

from __future__ import annotations

import hashlib
import json

import pytest

from spade_lib import config


def test_every_preset_loads_and_is_named() -> None:
    names = config.preset_names()
    for required in ["smoke", "cpu", "imagenet-resnet50", "imagenet-mobilenetv2",
                     "imagenet-convnext-t", "celeba-resnet50", "food101-resnet50"]:
        assert required in names
    for name in names:
        cfg = config.load(name)
        assert cfg.name == name


def test_full_presets_mirror_table_c9() -> None:
    c9 = {  # preset: (lr, lr_step, epochs, 1 / trojan group ratio, batch size)
        "imagenet-resnet50": (0.001, 3, 6, 1 / 3000, 64),
        "imagenet-mobilenetv2": (0.001, 3, 6, 1 / 3000, 64),
        "imagenet-convnext-t": (0.001, 3, 6, 1 / 3000, 64),
        "celeba-resnet50": (0.01, 10, 20, 1 / 300, 64),
        "celeba-mobilenetv2": (0.1, 10, 20, 1 / 300, 64),
        "celeba-convnext-t": (0.01, 10, 20, 1 / 300, 64),
        "food101-resnet50": (0.01, 50, 150, 1 / 3000, 64),
    }
    for name, (lr, step, epochs, fraction, batch) in c9.items():
        cfg = config.load(name)
        assert (cfg.lr, cfg.lr_step, cfg.epochs, cfg.batch_size) == (lr, step, epochs, batch)
        assert cfg.trojan_fraction == pytest.approx(fraction, rel=1e-3)
    assert config.load("food101-resnet50").weight_decay == 0.0005
    assert config.load("imagenet-convnext-t").augment == "convnext"
    assert "LRP" not in config.load("imagenet-mobilenetv2").methods
    for name in c9:  # no held-out model at full scale: the search tunes on training images
        assert config.load(name).tuning_rules is None, name
    for name in ("celeba-mobilenetv2", "celeba-convnext-t"):  # the same as ImageNet's siblings
        cfg, imagenet = config.load(name), config.load(name.replace("celeba", "imagenet"))
        assert (cfg.arch, cfg.sparsity, cfg.augment, cfg.methods) == (
            imagenet.arch, imagenet.sparsity, imagenet.augment, imagenet.methods)


def test_fashion_tuning_rules_are_refused_on_full_scale_data() -> None:
    with pytest.raises(ValueError, match="'tuning_rules': 'fashion-tuning'.*'imagenet'.*null"):
        config.load("smoke", dataset="imagenet")
    assert config.load("smoke", dataset="imagenet", tuning_rules=None).tuning_rules is None
    assert config.load("imagenet-resnet50", tuning_rules="imagenet").tuning_rules == "imagenet"


def test_sibling_presets_by_name_and_by_path(tmp_path) -> None:
    assert config.sibling_presets("cpu") == {"MobileNetV2-style": "cpu-mobilenetv2",
                                             "ConvNeXt-style": "cpu-convnext"}
    assert config.sibling_presets("imagenet-resnet50") == {
        "MobileNetV2-style": "imagenet-mobilenetv2", "ConvNeXt-style": "imagenet-convnext-t"}
    assert config.sibling_presets("celeba-resnet50")["ConvNeXt-style"] == "celeba-convnext-t"
    # the paper has no Food-101 MobileNetV2 or ConvNeXt-T
    assert config.sibling_presets("food101-resnet50") == {"MobileNetV2-style": None,
                                                          "ConvNeXt-style": None}
    main = tmp_path / "mine.yaml"
    main.write_text("base: smoke\ndata_dir: /here\n")
    (tmp_path / "mine-convnext.yaml").write_text("base: smoke-convnext\n")
    assert config.sibling_presets(main) == {"MobileNetV2-style": None,
                                            "ConvNeXt-style": str(tmp_path / "mine-convnext.yaml")}
    # a sibling on the same dataset reads the data where the main preset does
    cfg = config.load("imagenet-resnet50", data_dir="/data/imagenet")
    assert config.load_sibling(cfg, "imagenet-convnext-t").data_dir == "/data/imagenet"
    assert config.load_sibling(cfg, "imagenet-convnext-t", data_dir="/b").data_dir == "/b"
    assert config.load_sibling(cfg, "celeba-convnext-t").data_dir is None


def test_overrides_apply_and_are_validated() -> None:
    cfg = config.load("smoke", epochs=3, lr=1)
    assert cfg.epochs == 3 and cfg.lr == 1.0
    assert cfg.replace(samples=7).samples == 7 and cfg.samples != 7


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"epoch": 2}, ["'epoch'", "allowed keys", "epochs"]),
        ({"epochs": "2"}, ["'epochs'", "'2'", "int"]),
        ({"epochs": True}, ["'epochs'", "True", "int"]),
        ({"epochs": 0}, ["'epochs'", "0", "[1,"]),
        ({"arch": "vgg"}, ["'arch'", "'vgg'", "'resnet18'"]),
        ({"sparsity": 1.0}, ["sparsity", "1.0", "[0, 1)"]),
        ({"sparsity": -0.1}, ["sparsity", "-0.1", "[0, 1)"]),
        ({"sparsity": "cubic"}, ["sparsity", "'cubic'", "linear"]),
        ({"sparsity": "linear:0:1.5"}, ["sparsity", "1.5"]),
        ({"sparsity": {"fc": 2.0}}, ["sparsity", "2.0"]),
        ({"methods": "Saliency"}, ["'methods'", "list"]),
        ({"search_methods": ["Saliency", "Gradcam"]}, ["'search_methods'", "'Gradcam'", "LRP"]),
        ({"search_methods": []}, ["'search_methods'", "non-empty list of unique"]),
        ({"methods": ["Saliency", "Saliency"]}, ["'methods'", "non-empty list of unique"]),
        ({"image_size": 8}, ["'image_size'", "8", "[16,"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        config.load("smoke", **overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_good_sparsity_specs() -> None:
    for spec in [0.0, 0.5, "linear", "linear:0:0.99", "only:layers.3,fc:0.9", {"fc": 0.5}]:
        assert config.load("smoke", sparsity=spec).sparsity == spec


def test_unknown_preset_lists_valid_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'.*smoke"):
        config.load("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="'batchsize'"):
        config.load(bad)


def test_from_namespace_picks_up_papermill_parameters() -> None:
    namespace = {"preset": "smoke", "epochs": 5, "samples": None, "unrelated": 1}
    cfg = config.from_namespace("smoke", namespace)
    assert cfg.epochs == 5 and cfg.samples == config.load("smoke").samples


def test_digest_is_stable_and_sensitive() -> None:
    a, b = config.load("smoke"), config.load("smoke")
    assert a.digest() == b.digest()
    assert a.digest() != a.replace(epochs=a.epochs + 1).digest()
    assert a.digest(config.TRAINING_KEYS) == a.replace(samples=99).digest(config.TRAINING_KEYS)
    assert a.digest() == a.replace(name="other", cache_dir="/tmp/x").digest()


def test_preset_base_inherits_everything_but_the_name(tmp_path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("base: smoke\narch: mobilenetv2\nepochs: 2\n")
    cfg = config.load(child)
    smoke = config.load("smoke")
    assert cfg.name == "child" and cfg.arch == "mobilenetv2" and cfg.epochs == 2
    assert cfg.replace(name="smoke", arch=smoke.arch, epochs=smoke.epochs) == smoke
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text("base: child\nwidth: 6\n")
    assert config.load(grandchild).arch == "mobilenetv2"
    assert config.load(grandchild).width == 6
    for shipped in ("cpu-mobilenetv2", "cpu-convnext", "smoke-mobilenetv2", "smoke-convnext"):
        c = config.load(shipped)
        assert c.name == shipped and c.arch in ("mobilenetv2", "convnext")
        assert c.rules == config.load(shipped.split("-")[0]).rules


def test_preset_base_errors_name_the_problem(tmp_path) -> None:
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b\n")
    loop_b.write_text("base: a\n")
    with pytest.raises(ValueError, match="'base' chain loops"):
        config.load(loop_a)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: nope\n")
    with pytest.raises(ValueError, match="unknown preset"):
        config.load(bad)


@pytest.mark.parametrize(("key", "other"), [("random_shift", 2), ("optimizer", "adamw"),
                                            ("warmup_steps", 50)])
def test_late_keys_at_their_old_value_keep_old_digests(key: str, other: object) -> None:
    cfg = config.load("smoke")
    assert getattr(cfg, key) == config.LATE_KEYS[key]
    without = {k: v for k, v in cfg.to_dict().items()
               if k in config.TRAINING_KEYS and k not in config.LATE_KEYS}
    old = hashlib.sha256(json.dumps(without, sort_keys=True, default=str).encode()).hexdigest()
    assert cfg.digest(config.TRAINING_KEYS) == old[:12]
    assert cfg.replace(**{key: other}).digest(config.TRAINING_KEYS) != old[:12]


def test_parse_overrides_reads_yaml_values_and_names_a_bad_item() -> None:
    got = config.parse_overrides(["epochs=2", "sparsity={fc: 0.8}", "methods=[Saliency]",
                                  "device=cpu"])
    assert got == {"epochs": 2, "sparsity": {"fc": 0.8}, "methods": ["Saliency"],
                   "device": "cpu"}
    assert config.load("smoke", **got).sparsity == {"fc": 0.8}
    for bad in ("epochs", "=2"):
        with pytest.raises(ValueError, match=f"override '{bad}' is not of the form KEY=VALUE"):
            config.parse_overrides([bad])


def test_where_the_evaluation_runs_does_not_change_digests() -> None:
    cfg = config.load("smoke")
    far = cfg.replace(scheduler="tcp://10.0.0.1:8786", workers=4)
    assert far.digest() == cfg.digest()
    assert far.digest(("seed", "scheduler")) == cfg.digest(("seed",))
    with pytest.raises(ValueError, match="workers"):
        cfg.replace(workers=0)


def test_chapter_defaults_follow_another_preset_without_changing_any_digest() -> None:
    from spade_lib import galleries, insertion

    cpu = config.load("cpu")
    assert cpu.defaults_name == "cpu" and galleries.chapter_steps(cpu) == 512
    tiny = cpu.replace(name="tiny-folder", chapter_defaults="smoke")
    assert tiny.defaults_name == "smoke"
    assert galleries.chapter_steps(tiny) == galleries.STEPS["smoke"]
    assert insertion.default_count(tiny) == insertion.DEFAULT_SAMPLES["smoke"]
    assert galleries.chapter_steps(cpu.replace(name="tiny-folder")) == 512
    assert tiny.digest() == cpu.digest(), "a chapter default is not a result's key"
