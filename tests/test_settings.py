"""Each command's defaults have one source: its settings dataclass. Every Click option that
sets a settings field must default to that field's default, so the two cannot drift."""

from __future__ import annotations

import json
from dataclasses import fields

import click
import pytest

from segdeploy.bench.run import BenchSettings, InputOptions
from segdeploy.cli.bench import bench
from segdeploy.cli.export import export
from segdeploy.cli.serve import serve
from segdeploy.cli.train import train
from segdeploy.cli.validate import validate
from segdeploy.data import DatasetSpec
from segdeploy.export import ExportSettings
from segdeploy.serve.settings import ServeSettings
from segdeploy.train import TrainConfig
from segdeploy.validate import ValidationSettings


def _defaults(command: click.Command) -> dict:
    """What each option gives when not on the command line (a flag without a default: off)."""
    ctx = click.Context(command)
    return {
        p.name: p.get_default(ctx, call=True) for p in command.params if isinstance(p, click.Option)
    }


def _check(
    command: click.Command, settings, renames: dict | None = None, convert=None, skip=()
) -> int:
    """Compare every option named like a field of `settings`; returns how many were compared."""
    renames = renames or {}
    convert = convert or {}
    options = _defaults(command)
    compared = 0
    for f in fields(settings):
        option = renames.get(f.name, f.name)
        if option not in options or f.name in skip:
            continue
        value = options[option]
        value = convert[option](value) if option in convert else value
        assert value == getattr(settings, f.name), (command.name, option, value)
        compared += 1
    return compared


def test_validate_options_default_to_validation_settings():
    assert _check(validate, ValidationSettings()) == len(fields(ValidationSettings))


def test_export_options_default_to_export_settings():
    settings = ExportSettings()
    # every field but the nested validation settings, and those through them
    assert _check(export, settings) == len(fields(ExportSettings)) - 1
    assert _check(export, settings.validation) == len(fields(ValidationSettings))


def test_train_options_default_to_train_config():
    config = TrainConfig()
    compared = _check(train, config, skip=("dataset",))
    # save_total_limit has no option; dataset is checked through its spec below
    assert compared == len(fields(TrainConfig)) - 2
    spec_defaults = DatasetSpec(config.dataset.name)
    options = _defaults(train)
    assert options["dataset"] == config.dataset.name
    for name in ("test_size", "seed", "ignore_index", "reduce_labels", "id2label_file"):
        key = "id2label_file" if name == "id2label_file" else name
        assert options[key] == getattr(spec_defaults, name), name
    # --split's default is chosen per dataset; for the default dataset it is the config's.
    assert options["split"] is None and config.dataset.split == "train[:50]"


def test_bench_options_default_to_bench_settings():
    settings = BenchSettings()
    compared = _check(
        bench,
        settings,
        renames={"timeout_s": "timeout"},
        convert={"batch_sizes": lambda text: tuple(int(x) for x in text.split(","))},
    )
    # every field but the nested input options, and those through them
    assert compared == len(fields(BenchSettings)) - 1
    assert _check(bench, settings.inputs) == len(fields(InputOptions))


def test_serve_options_default_to_serve_settings():
    assert _check(serve, ServeSettings()) == len(fields(ServeSettings))


def test_infer_video_options_default_to_video_settings():
    from segdeploy.cli.infer import infer
    from segdeploy.runtime.clips import VideoSettings

    compared = _check(infer, VideoSettings(), renames={"labels": "video_labels"})
    assert compared == len(fields(VideoSettings))


def test_tile_options_default_to_tile_options():
    """infer's --tile/--stride/--overlap/--blend (bench, validate and export have them as
    fields of their settings, compared above)."""
    from segdeploy.cli.infer import infer
    from segdeploy.runtime.tiles import TileOptions

    assert _check(infer, TileOptions()) == len(fields(TileOptions))


@pytest.mark.parametrize(
    "settings",
    [ValidationSettings(tolerance=0.01), ExportSettings(fp16=True), BenchSettings(), TrainConfig()],
)
def test_settings_are_json(settings):
    data = settings.to_json()
    assert json.loads(json.dumps(data)) == json.loads(json.dumps(data, sort_keys=True))
    assert isinstance(data, dict) and data
