"""The pipeline's settings by section: ``section.key`` and nested mappings name the same flat settings, a wrong
section is refused naming the right one, ``ablation_bases`` is a list, and docs/pipeline.md's table is SECTIONS."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from polca_jax.errors import PolcaError
from polca_jax.pipeline import SECTIONS, RunConfig, flat_settings, load_task_definition, make_config, parse_overrides

PLANTED = load_task_definition("planted")
DOCS = Path(__file__).parents[1] / "docs" / "pipeline.md"


def test_every_pipeline_setting_is_in_exactly_one_section():
    names = [name for section in SECTIONS.values() for name in section]
    settable = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("task", "preset", "task_options")]
    assert sorted(names) == sorted(settable) and len(names) == len(set(names))


def test_the_docs_table_lists_the_sections_as_the_code_has_them():
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", DOCS.read_text(), flags=re.MULTILINE)
    table = {section: re.findall(r"`(\w+)`", cells) for section, cells in rows}
    assert {section: tuple(names) for section, names in table.items() if section != "task"} == SECTIONS


def test_a_setting_named_with_its_section_or_nested_is_the_same_setting():
    flat = make_config(PLANTED, "planted", "tiny", {"lanczos_iters": 7, "polca_every": 5, "width": 4})
    dotted = make_config(PLANTED, "planted", "tiny", {"basis.lanczos_iters": 7, "decompose.polca_every": 5,
                                                      "task.width": 4})
    nested = make_config(PLANTED, "planted", "tiny", {"basis": {"lanczos_iters": 7}, "decompose": {"polca_every": 5},
                                                      "task": {"width": 4}})
    assert flat == dotted == nested
    assert nested.sections()["basis"]["lanczos_iters"] == 7 and nested.sections()["task"]["width"] == 4
    assert parse_overrides(PLANTED, ["basis.lanczos_iters=3", "task.width=16", "score.window_steps=none"]) == {
        "lanczos_iters": 3, "width": 16, "window_steps": None}


@pytest.mark.parametrize("assignment, message", [
    ("decompose.lanczos_iters=3", r"'lanczos_iters' is not a decompose setting; it is basis.lanczos_iters"),
    ("training.nonsense=3", r"the training settings are checkpoints, learning_rate"),
    ("optimizer.learning_rate=1", r"unknown section 'optimizer'.*name the setting alone: learning_rate"),
    ("task.seed=1", r"'seed' is a pipeline setting, not a task option: training.seed"),
])
def test_a_setting_under_the_wrong_section_is_refused_naming_the_right_one(assignment, message):
    with pytest.raises(PolcaError, match=message):
        parse_overrides(PLANTED, [assignment])


def test_a_setting_given_twice_is_refused():
    with pytest.raises(PolcaError, match="'lanczos_iters' is given twice"):
        flat_settings({"lanczos_iters": 3, "basis": {"lanczos_iters": 4}})


def test_ablation_bases_is_a_list_read_from_a_list_or_from_comma_separated_text():
    text = parse_overrides(PLANTED, ["ablation_bases=random, parameter_axes"])
    from_text = make_config(PLANTED, "planted", "tiny", text)
    from_list = make_config(PLANTED, "planted", "tiny", {"basis": {"ablation_bases": ["random", "parameter_axes"]}})
    assert from_text == from_list and from_list.ablation_bases == ("random", "parameter_axes")
    stored = json.loads(json.dumps(from_list.to_dict()))
    assert stored["ablation_bases"] == ["random", "parameter_axes"]
    assert RunConfig.from_dict(stored, "config.json") == from_list
    older = {**stored, "ablation_bases": "random,parameter_axes"}  # config.json before the list
    assert RunConfig.from_dict(older, "config.json") == from_list
    with pytest.raises(PolcaError, match="ablation_bases must be a list of basis names"):
        make_config(PLANTED, "planted", "tiny", {"ablation_bases": 3})
